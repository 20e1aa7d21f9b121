"""Generation backends behind one interface: vLLM (streaming) and plain transformers."""
