"""Lowering of a converted program to deployable engines (installed as ``mla_pass.export``).

Planned here: ONNX with the compressed KV cache as graph inputs/outputs, and TensorRT via
torch-tensorrt. Not implemented yet: the decode-step program that it will export is
``MLAModel.step`` (inputs ``input_ids, position_ids, attention_mask, past...``; outputs
``logits, present...``; names in ``MLAModel.cache_spec``).
"""
