import pytest
import torch
from safetensors.torch import save_file

from curvlens import Checkpoint, CurvlensError, Moments
from curvlens.io.writer import write_model


class Tiny(torch.nn.Module):
    """Parameter order (l1, norm, l2) differs from alphabetical order (l1, l2, norm)."""

    def __init__(self):
        super().__init__()
        self.l1 = torch.nn.Linear(4, 3)
        self.norm = torch.nn.LayerNorm(3)
        self.l2 = torch.nn.Linear(3, 2)


def trained(groups="one", steps=3):
    torch.manual_seed(0)
    model = Tiny()
    if groups == "one":
        params = model.parameters()
    else:  # the HF Trainer's split: weight decay for weights, none for biases and norms
        decay = [p for n, p in model.named_parameters() if not (n.endswith("bias") or "norm" in n)]
        rest = [p for n, p in model.named_parameters() if n.endswith("bias") or "norm" in n]
        params = [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.999), eps=1e-8)
    for _ in range(steps):
        opt.zero_grad()
        model.l2(model.norm(model.l1(torch.randn(5, 4)))).pow(2).sum().backward()
        opt.step()
    return model, opt


def expected(model, opt):
    return {n: opt.state[p]["exp_avg_sq"] for n, p in model.named_parameters()}


def test_exported_safetensors_plain_and_suffixed_keys(tmp_path):
    model, opt = trained()
    want = expected(model, opt)
    save_file(want, str(tmp_path / "a.safetensors"))
    save_file({k + ".exp_avg_sq": v for k, v in want.items()}, str(tmp_path / "b.safetensors"))
    for f in ("a", "b"):
        m = Moments.open(tmp_path / f"{f}.safetensors")
        assert set(m) == set(want)
        for k, v in want.items():
            assert torch.equal(m[k], v)


@pytest.mark.parametrize("groups", ["one", "hf_trainer"])
def test_index_keyed_optimizer_state_mapped_by_parameter_order(tmp_path, groups):
    model, opt = trained(groups)
    want = expected(model, opt)
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    names = [n for n, _ in model.named_parameters()]
    if groups == "one":
        m = Moments.open(tmp_path / "optimizer.pt", checkpoint=names)
    else:  # needs the model's shapes to tell the two orders apart
        ckpt = Checkpoint.open({n: p.detach() for n, p in model.named_parameters()})
        m = Moments.open(tmp_path / "optimizer.pt", checkpoint=ckpt)
    assert m.step == 3 and m.beta2 == 0.999
    for k, v in want.items():
        assert torch.equal(m[k], v), k


def test_index_keyed_state_needs_checkpoint(tmp_path):
    _, opt = trained()
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    with pytest.raises(CurvlensError, match="keyed by parameter index; pass checkpoint="):
        Moments.open(tmp_path / "optimizer.pt")


def test_wrong_number_of_parameters(tmp_path):
    model, opt = trained()
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    names = [n for n, _ in model.named_parameters()][:-1]
    with pytest.raises(CurvlensError, match="optimizer has 6 parameters, the model has 5"):
        Moments.open(tmp_path / "optimizer.pt", checkpoint=names)


def test_shape_mismatch_in_index_mapping(tmp_path):
    model, opt = trained()
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    # alphabetical file order is not the optimizer's order: shapes give it away
    ckpt = Checkpoint.open(dict(sorted((n, p.detach()) for n, p in model.named_parameters())))
    with pytest.raises(CurvlensError, match=r"moment shape .* != weight shape"):
        Moments.open(tmp_path / "optimizer.pt", checkpoint=ckpt)


def test_name_keyed_state_and_bias_correction():
    model, opt = trained()
    want = expected(model, opt)
    state = {"state": {n: {"exp_avg_sq": v, "step": torch.tensor(3.0)} for n, v in want.items()},
             "param_groups": [{"betas": (0.9, 0.999)}]}
    m = Moments.open(state, bias_correction=True)
    scale = 1 / (1 - 0.999**3)
    for k, v in want.items():
        torch.testing.assert_close(m[k], v * scale)
    assert m.bias_corrected


def test_bias_correction_needs_step_and_beta2(tmp_path):
    save_file({"w": torch.ones(2)}, str(tmp_path / "v.safetensors"))
    with pytest.raises(CurvlensError, match="needs the optimizer step and beta2.*step=None"):
        Moments.open(tmp_path / "v.safetensors", bias_correction=True)


def test_hf_trainer_checkpoint_dir(tmp_path):
    """optimizer.pt beside model files + config.json: order from the architecture."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=12, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
    opt.step()
    model.save_pretrained(tmp_path)
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    m = Moments.open(tmp_path)
    for n, p in model.named_parameters():
        assert torch.equal(m[n], opt.state[p]["exp_avg_sq"]), n
    m.validate(tmp_path)


def test_validate_reports_every_problem(tmp_path):
    w = {"a": torch.zeros(2, 2), "b": torch.zeros(3), "c": torch.zeros(2), "d": torch.zeros(1)}
    v = {"a": torch.tensor([[1.0, float("nan")], [0.0, float("inf")]]),
         "b": torch.tensor([1.0, -2.0, 0.0]), "c": torch.zeros(3)}
    save_file(v, str(tmp_path / "v.safetensors"))
    with pytest.raises(CurvlensError) as info:
        Moments.open(tmp_path / "v.safetensors").validate(w)
    msg = str(info.value)
    assert "a: 2 non-finite" in msg
    assert "b: 1 negative" in msg
    assert "c: moment shape (3,) != weight shape (2,)" in msg
    assert "d: no moment" in msg


def test_validate_passes_on_good_moments():
    Moments.open({"a": torch.rand(2, 2)}).validate({"a": torch.zeros(2, 2)})


def test_expert_dir_export_layout(tmp_path):
    d = write_model({"a": torch.zeros(2)}, tmp_path / "e")
    (d / "export").mkdir()
    save_file({"a": torch.ones(2)}, str(d / "export" / "exp_avg_sq.safetensors"))
    assert torch.equal(Moments.open(d)["a"], torch.ones(2))


def test_dir_without_moments(tmp_path):
    with pytest.raises(CurvlensError, match="no second moments found"):
        Moments.open(tmp_path)


def test_parameters_never_updated_read_as_zero_moments_with_a_warning(tmp_path):
    """A parameter no gradient reached (an unused pooler or head) has no optimizer
    state; Adam's moment there would be 0: read as 0, said in a warning and listed."""
    torch.manual_seed(0)
    model = Tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.norm(model.l1(torch.randn(5, 4))).pow(2).sum().backward()  # l2 gets no gradient
    opt.step()
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    ckpt = Checkpoint.open({n: p.detach() for n, p in model.named_parameters()})
    with pytest.warns(UserWarning, match=r"2 parameter\(s\) the optimizer lists were never updated"):
        m = Moments.open(tmp_path / "optimizer.pt", checkpoint=ckpt)
    assert m.never_updated == ("l2.weight", "l2.bias")
    assert torch.equal(m["l2.weight"], torch.zeros(2, 3)) and m["l1.weight"].abs().sum() > 0
    m.validate(ckpt)


def test_an_explicit_name_list_is_checked_against_the_model_beside(tmp_path):
    """A wrong explicit order is caught by the shapes of the model saved next to
    the optimizer state, instead of mis-mapping silently."""
    model, opt = trained()
    names = [n for n, _ in model.named_parameters()]
    write_model({n: p.detach() for n, p in model.named_parameters()}, tmp_path / "run")
    torch.save(opt.state_dict(), tmp_path / "run" / "optimizer.pt")
    m = Moments.open(tmp_path / "run" / "optimizer.pt", checkpoint=names)
    assert torch.equal(m["l2.weight"], opt.state[model.l2.weight]["exp_avg_sq"])
    with pytest.raises(CurvlensError, match=r"moment shape .* != weight shape"):
        Moments.open(tmp_path / "run" / "optimizer.pt", checkpoint=sorted(names))
