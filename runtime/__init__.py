"""Runtime for exported engines (installed as ``mla_pass.runtime``).

It must import no torch (numpy, onnxruntime and tokenizers only) so it can ship to edge
devices; a test checks that in a fresh interpreter. The engine driver itself is not
implemented yet.
"""
