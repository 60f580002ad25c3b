import pytest
import torch


@pytest.fixture(scope="session")
def varied_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny Llama with larger random weights: its greedy output is varied, visible text, not one
    repeated whitespace token, so comparisons of served and offline text are not vacuous."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("varied-llama")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:  # weight matrices and embeddings; norms stay at one
                p.normal_(0, 0.3, generator=gen)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out
