"""Every custom op of the pass (``torch.ops.mla_pass.*``), each with its eager and fake kernel:
``cache_write`` (in-place cache update), ``group_query_attention``, ``matmul_integer``,
``cache_append`` (Hugging Face's DynamicLayer update under torch.compile), ``choose_form`` (a
site's form by the prompt length, an ONNX ``If``)."""
