"""``torch.compile(model, backend="mla")``: the pass as a PyTorch 2 compiler backend
(``backend``), the sites of a dynamo graph through Hugging Face's cache (``graph_sites``), and the
``DynamicLayer`` hook that lets that cache hold compressed tensors (``hf_cache``)."""
