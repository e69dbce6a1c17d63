"""Model names, the blob store and manifests, Modelfiles, create and pull."""
