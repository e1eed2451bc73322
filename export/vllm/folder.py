"""The names a vLLM export folder is made of (shared by the writer, the reference and the plugin)."""
ARCHITECTURE = "MLAPassLlamaForCausalLM"     # the plugin's model class (model.py), named in config.json
FORMAT_VERSION = 1                           # config.json's mla_pass.format_version
WEIGHTS_FILE = "model.safetensors"
