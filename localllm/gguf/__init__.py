"""Reading and validating GGUF files before llama.cpp ever sees them."""
