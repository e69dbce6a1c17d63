"""The only code that calls llama_cpp: model/context lifetime and the batching worker thread."""
