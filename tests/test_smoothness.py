"""alum_pretrain.smoothness: the eval-mode adversarial SymKL against an independent float64 reference, its
guarantees (ascent >= random, repeatable, relative ε follows the embedding scale), entropy matching and the
``alum-smoothness`` command.

Reference (written from the math, not from the module).  For logits z and z + dz, p = softmax(z),
q = softmax(z + dz):  log q − log p = dz − (lse(z + dz) − lse(z)) = dz − 1·(pᵀdz) + O(dz²) and
q − p = F dz + O(dz²) with F = diag(p) − ppᵀ, so

    SymKL(p, q) = KL(p‖q) + KL(q‖p) = Σ_c (q_c − p_c)(log q_c − log p_c)
                = (F dz)ᵀ (dz − 1 pᵀdz) + O(dz³) = dzᵀ F dz + O(dz³)      (1ᵀF = pᵀ − pᵀ = 0),

i.e. twice ½ dzᵀFdz, the second-order term of each KL.  With dz_i = J_i δ (J_i the (V, T·H) Jacobian of
masked token i's logits w.r.t. the sequence's embeddings) the sequence's summed SymKL is δᵀ A δ with
A = Σ_i J_iᵀ F_i J_i, whose maximum over the L2 ball ‖δ‖₂ ≤ ε is ε² λ_max(A).  The measured mean over all
masked tokens therefore tends to Σ_b ε² λ_max(A_b) / N as ε → 0 (and converged ascent).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from alum_pretrain.masking import MaskingConfig, TokenMasker
from alum_pretrain.smoothness import (SmoothnessConfig, fit_temperature, flat_metrics, measure_smoothness,
                                      mlm_logits, mlm_stats)
from alum_pretrain.smoothness_cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


class TinyMLM(nn.Module):
    """An explicit float64 'masked LM' with the PretrainModel API: embeddings c·E[ids]; the logits of position t
    are W2 tanh(W1 x_t/c + U mean_s(x_s/c) + b1) + b2 (the mean over real tokens couples the positions).  The
    function of the token ids does not depend on c, so a relative ε must measure the same for every c."""

    def __init__(self, V: int = 13, H: int = 5, hidden: int = 9, scale: float = 1.0, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        r = lambda *s: nn.Parameter(torch.randn(*s, generator=g, dtype=F64))  # noqa: E731
        self.E, self.W1, self.U, self.b1 = r(V, H), r(hidden, H), r(hidden, H), r(hidden)
        self.W2, self.b2 = nn.Parameter(torch.randn(V, hidden, generator=g, dtype=F64) * 1.5), r(V)
        self.scale = scale
        self.drop = nn.Dropout(0.5)  # active only in training mode: the measurement must switch it off

    def embed(self, input_ids, token_type_ids=None):
        return self.scale * self.E[input_ids]

    def heads_from_embeds(self, embeds, attention_mask, token_type_ids, masked_index, need_nsp=False):
        x = self.drop(embeds / self.scale)
        m = attention_mask.to(x.dtype).unsqueeze(-1)
        ctx = (x * m).sum(1, keepdim=True) / m.sum(1, keepdim=True)
        z = torch.tanh(x @ self.W1.T + ctx @ self.U.T + self.b1) @ self.W2.T + self.b2  # (B, T, V)
        idx = masked_index.reshape(-1).nonzero().squeeze(1) if masked_index.dtype == torch.bool else masked_index
        return z.reshape(-1, z.shape[-1]).index_select(0, idx), None


def tiny_bert(V: int = 23, seed: int = 0):
    from transformers import BertConfig, BertForMaskedLM

    from alum_pretrain.models import PretrainModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=V, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                     max_position_embeddings=16, hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3,
                     initializer_range=0.5)
    return PretrainModel(BertForMaskedLM(cfg).double())


def labelled_batch(B: int, T: int, V: int, masked: list[list[int]], seed: int = 1) -> dict:
    """A pre-masked batch (labels given): ids random, the listed positions of each row are predicted."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, V, (B, T), generator=g)
    labels = torch.full((B, T), -100)
    for b, ps in enumerate(masked):
        for p in ps:
            labels[b, p] = ids[b, p]
            ids[b, p] = 4  # the "[MASK]" id
    return {"input_ids": ids, "attention_mask": torch.ones(B, T, dtype=torch.long),
            "token_type_ids": torch.zeros(B, T, dtype=torch.long), "labels": labels}


def reference_adv(model, batch: dict, eps: float) -> float:
    """Σ_b ε² λ_max(Σ_{i∈b} J_iᵀ F_i J_i) / N from explicit Jacobians (see the module docstring)."""
    model.eval()
    total, n = 0.0, 0
    for b in range(batch["input_ids"].shape[0]):
        ids = batch["input_ids"][b:b + 1]
        att, tt = batch["attention_mask"][b:b + 1], batch["token_type_ids"][b:b + 1]
        mask = batch["labels"][b:b + 1] != -100
        e = model.embed(ids, tt).detach()
        T, H = e.shape[1:]

        def logits(d):
            return model.heads_from_embeds(e + d.view(1, T, H), att, tt, mask)[0]  # (N_b, V)

        z = logits(torch.zeros(T * H, dtype=F64)).detach()
        J = torch.autograd.functional.jacobian(logits, torch.zeros(T * H, dtype=F64))  # (N_b, V, T*H)
        p = torch.softmax(z, -1)
        A = torch.zeros(T * H, T * H, dtype=F64)
        for i in range(z.shape[0]):
            Fi = torch.diag(p[i]) - torch.outer(p[i], p[i])
            A += J[i].T @ Fi @ J[i]
        total += eps ** 2 * float(torch.linalg.eigvalsh(A)[-1])
        n += z.shape[0]
    return total / n


@pytest.mark.parametrize("kind", ["mlp", "bert"])
def test_l2_sequence_ball_reaches_eps2_lambda_max_of_input_fisher(kind):
    model = TinyMLM() if kind == "mlp" else tiny_bert()
    V = 13 if kind == "mlp" else 23
    batch = labelled_batch(3, 6, V, [[1, 4], [0], [2, 3, 5]])
    cfg = SmoothnessConfig(epsilons=(1e-3, 1e-4, 1e-5), norms=("l2",), ball="sequence", steps=60, step_scale=1e3)
    err = {}
    for r in measure_smoothness(model, [batch], cfg=cfg)["results"]:
        err[r["eps"]] = abs(r["adv_sym_kl"] / reference_adv(model, batch, r["eps"]) - 1)
        assert r["rand_sym_kl"] < r["adv_sym_kl"]
        assert r["radius_mean"] == pytest.approx(r["eps"])
    assert err[1e-5] < 2e-4  # the O(ε) third-order remainder shrinks with ε (tiny BERT: 6e-3, 6e-4, 6e-5)
    assert err[1e-5] <= err[1e-4] + 1e-7 <= err[1e-3] + 2e-7


def test_token_ball_on_single_positions_matches_the_reference():
    """With one position per sequence the per-token L2 ball is the sequence ball."""
    model = TinyMLM(seed=3)
    batch = labelled_batch(4, 1, 13, [[0], [0], [0], [0]])
    cfg = SmoothnessConfig(epsilons=(1e-5,), norms=("l2",), ball="token", steps=60, step_scale=1e3)
    r = measure_smoothness(model, [batch], cfg=cfg)["results"][0]
    assert r["adv_sym_kl"] == pytest.approx(reference_adv(model, batch, 1e-5), rel=2e-4)


def test_small_eps_scales_quadratically():
    model = TinyMLM(seed=5)
    batch = labelled_batch(2, 5, 13, [[0, 2], [1, 3]])
    cfg = SmoothnessConfig(epsilons=(1e-5, 1e-4), norms=("linf", "l2"))
    res = {(r["norm"], r["eps"]): r for r in measure_smoothness(model, [batch], cfg=cfg)["results"]}
    for norm in ("linf", "l2"):
        for what in ("adv_sym_kl", "rand_sym_kl"):
            assert res[(norm, 1e-4)][what] / res[(norm, 1e-5)][what] == pytest.approx(100, rel=2e-2)


def _masker(V: int, seed: int = 0) -> TokenMasker:
    return TokenMasker(MaskingConfig(), mask_id=4, random_pool=torch.arange(5, V), seed=seed)


def _unmasked(B: int, T: int, V: int, seed: int = 2) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(2):
        ids = torch.randint(5, V, (B, T), generator=g)
        ids[:, 0], ids[:, -1] = 2, 3  # [CLS] ... [SEP]
        att = torch.ones(B, T, dtype=torch.long)
        att[0, -2:] = 0  # padding in the first row
        ids[0, -2:] = 0
        out.append({"input_ids": ids, "attention_mask": att, "token_type_ids": torch.zeros_like(ids),
                    "special_mask": (ids <= 4)})
    return out


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_ascent_beats_random_and_restores_the_mode(norm):
    model = tiny_bert(seed=4)
    model.train()
    cfg = SmoothnessConfig(epsilons=(1e-3, 1e-2), norms=(norm,), steps=3, mask_rate=0.3)
    res = measure_smoothness(model, _unmasked(3, 10, 23), _masker(23), cfg)
    assert model.training  # restored
    assert all(p.grad is None for p in model.parameters())  # the ascent differentiates w.r.t. δ only
    assert res["n_masked"] > 0 and res["n_tokens"] == 2 * (3 * 10 - 2)
    for r in res["results"]:
        assert r["adv_sym_kl"] > 1.5 * r["rand_sym_kl"] > 0, r
        assert r["adv_max"] >= r["adv_p99"] >= r["adv_p90"] >= r["adv_p50"] >= 0
        assert r["ratio"] == pytest.approx(r["adv_sym_kl"] / r["rand_sym_kl"])


def test_same_numbers_twice_and_dropout_off():
    model = tiny_bert(seed=6)
    cfg = SmoothnessConfig(epsilons=(1e-4, 1e-3), norms=("linf", "l2"), seed=7)
    batches = _unmasked(2, 12, 23)
    model.train()
    a = measure_smoothness(model, batches, _masker(23, seed=7), cfg)
    b = measure_smoothness(model, batches, _masker(23, seed=7), cfg)
    assert a == b
    c = measure_smoothness(model, batches, _masker(23, seed=7), SmoothnessConfig(**{**cfg.__dict__, "seed": 8}))
    assert c["mlm_nll"] == a["mlm_nll"]  # same masks: the seed of the random δ only
    assert c["results"][0]["rand_sym_kl"] != a["results"][0]["rand_sym_kl"]


def test_relative_eps_follows_the_embedding_scale():
    batches = _unmasked(2, 8, 13)
    cfg = dict(epsilons=(1e-3,), norms=("linf", "l2"), mask_rate=0.4)
    small, big = TinyMLM(scale=1.0, seed=2), TinyMLM(scale=10.0, seed=2)
    rel = [measure_smoothness(m, batches, _masker(13), SmoothnessConfig(eps_mode="rel", **cfg)) for m in (small, big)]
    assert rel[1]["embed_rms"] == pytest.approx(10 * rel[0]["embed_rms"])
    for r0, r1 in zip(rel[0]["results"], rel[1]["results"]):
        assert r1["adv_sym_kl"] == pytest.approx(r0["adv_sym_kl"], rel=1e-6)
        assert r1["rand_sym_kl"] == pytest.approx(r0["rand_sym_kl"], rel=1e-6)
        # ε × the token's RMS for L∞, × its L2 norm (RMS × sqrt(H), H = 5) for L2: training's alum.scale=rel
        unit = 5 ** 0.5 if r0["norm"] == "l2" else 1.0
        assert r0["radius_mean"] == pytest.approx(1e-3 * rel[0]["embed_rms"] * unit)
    # an absolute ε is not scale-free: at 10× the embeddings it takes 10× the ε for the same figure
    a0 = measure_smoothness(small, batches, _masker(13), SmoothnessConfig(**cfg))
    a1 = measure_smoothness(big, batches, _masker(13), SmoothnessConfig(**{**cfg, "epsilons": (1e-2,)}))
    for r0, r1 in zip(a0["results"], a1["results"]):
        assert r1["adv_sym_kl"] == pytest.approx(r0["adv_sym_kl"], rel=1e-6)
    a1_same = measure_smoothness(big, batches, _masker(13), SmoothnessConfig(**cfg))
    assert a1_same["results"][0]["adv_sym_kl"] < 0.05 * a0["results"][0]["adv_sym_kl"]


def test_temperature_fit_and_stats():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(50, 17, generator=g) * 3
    t = torch.randint(0, 17, (50,), generator=g)
    target = mlm_stats(z / 2, t)["entropy"]
    assert fit_temperature(z, target) == pytest.approx(2.0, rel=1e-5)
    lp = torch.log_softmax(z.double(), -1)
    s = mlm_stats(z, t)
    assert s["mlm_nll"] == pytest.approx(float(-lp.gather(1, t[:, None]).mean()))
    assert s["entropy"] == pytest.approx(float(-(lp.exp() * lp).sum(-1).mean()))
    with pytest.raises(ValueError, match="outside"):
        fit_temperature(z, math.log(17) + 0.1)
    model = TinyMLM()
    batches = _unmasked(2, 8, 13)
    logits, targets = mlm_logits(model, batches, _masker(13))
    res = measure_smoothness(model, batches, _masker(13), SmoothnessConfig(epsilons=(1e-3,)), temperature=1.5)
    assert res["entropy"] == pytest.approx(mlm_stats(logits, targets, 1.5)["entropy"], rel=1e-6)
    keys = flat_metrics(res)
    assert {"smooth_adv_kl_eps0.001", "smooth_rand_kl_eps0.001", "smooth_ratio_eps0.001", "smooth_entropy"} <= set(keys)


def test_config_errors():
    with pytest.raises(ValueError, match="--ball sequence"):
        SmoothnessConfig(norms=("linf",), ball="sequence")
    with pytest.raises(ValueError, match="--norm"):
        SmoothnessConfig(norms=("l1",))
    with pytest.raises(ValueError, match="--eps"):
        SmoothnessConfig(epsilons=(0.0,))
    with pytest.raises(ValueError, match="masker"):
        measure_smoothness(TinyMLM(), _unmasked(2, 6, 13))


# ---- the command -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A data-bin, an HF folder of a tiny BERT with the data-bin's tokenizer, and a checkpoint layout of it."""
    import yaml
    from transformers import AutoTokenizer

    from alum_pretrain.models import build_scratch_model, save_model
    from engine_helpers import make_stdlib_databin

    root = tmp_path_factory.mktemp("smooth")
    data = make_stdlib_databin(root / "data-bin", n_docs=40, vocab_size=400)
    tok = AutoTokenizer.from_pretrained(str(data / "tokenizer"))
    torch.manual_seed(0)
    hf = build_scratch_model("tiny", len(tok), tok.pad_token_id, nsp=False, max_position_embeddings=64,
                             num_hidden_layers=1, hidden_size=32, intermediate_size=64)
    save_model(hf, root / "hf")
    tok.save_pretrained(str(root / "hf"))
    step = root / "run" / "checkpoints" / "step-5"
    save_model(hf, step / "model")
    torch.save({"step": 5}, step / "train_state.pt")
    (root / "run" / "config.yaml").write_text(yaml.safe_dump({"data": {"path": str(data)}}))
    from transformers import BertModel

    BertModel(hf.config).save_pretrained(str(root / "headless"))  # no MLM head: a fresh one at load time
    tok.save_pretrained(str(root / "headless"))
    text = root / "held_out.txt"
    text.write_text("The quick brown fox jumps over the lazy dog.\n\nA function returns a value.\n" * 20)
    return root, data


def test_cli_repeatable_json_and_table(tiny_run, capsys):
    root, data = tiny_run
    args = [str(root / "hf"), "--data", str(data), "--seq-len", "32", "--batch-size", "4", "--batches", "2",
            "--eps", "1e-4,1e-2", "--norm", "linf,l2", "--no-progress"]
    assert main(args + ["--json", str(root / "a.json")]) == 0
    out = capsys.readouterr().out
    assert "adv SymKL" in out and "ratio" in out and "entropy" in out
    assert main(args + ["--json", str(root / "b.json")]) == 0
    a, b = (json.loads((root / f).read_text()) for f in ("a.json", "b.json"))
    assert a == b
    assert a["data"]["sequences"] == 8 and a["matched"] is None
    assert len(a["raw"]["results"]) == 4
    assert all(r["adv_sym_kl"] >= r["rand_sym_kl"] > 0 for r in a["raw"]["results"])
    # the training checkpoint of the same weights gives the same numbers (tokenizer found through the run)
    assert main([str(root / "run" / "checkpoints" / "step-5")] + args[1:] + ["--json", str(root / "c.json")]) == 0
    c = json.loads((root / "c.json").read_text())
    assert c["kind"] == "checkpoint" and c["step"] == 5 and c["raw"] == a["raw"]


def test_cli_fresh_head_is_repeatable(tiny_run):
    root, data = tiny_run
    args = [str(root / "headless"), "--data", str(data), "--seq-len", "32", "--batches", "1", "--eps", "1e-3",
            "--no-progress", "--json"]
    assert main(args + [str(root / "h1.json")]) == 0 and main(args + [str(root / "h2.json")]) == 0
    assert (root / "h1.json").read_text() == (root / "h2.json").read_text()


def test_cli_match_entropy_and_text(tiny_run, capsys):
    root, data = tiny_run
    assert main([str(root / "hf"), "--text", str(root / "held_out.txt"), "--seq-len", "24", "--eps", "1e-3",
                 "--match-entropy", str(root / "hf"), "--json", "-", "--no-progress"]) == 0
    cap = capsys.readouterr()
    doc = json.loads(cap.out)
    assert "temperature T = " in cap.err
    m = doc["matched"]
    assert m["temperature"] == pytest.approx(1.0, abs=1e-4)  # matched to itself
    assert m["result"]["entropy"] == pytest.approx(m["reference_entropy"], abs=1e-5)
    assert {"mlm_nll", "entropy"} <= set(doc["raw"]) and "reference_mlm_nll" in m
    assert doc["data"]["kind"] == "text" and doc["raw"]["n_masked"] > 0


def test_cli_errors_name_the_path(tiny_run, tmp_path, capsys):
    root, data = tiny_run
    (tmp_path / "junk").mkdir()
    assert main([str(tmp_path / "junk"), "--data", str(data)]) == 2
    assert str(tmp_path / "junk") in capsys.readouterr().err
    assert main([str(root / "hf"), "--data", str(data), "--split", "nosuch", "--no-progress"]) == 2
    assert "nosuch" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert main([str(root / "hf"), "--text", str(empty), "--no-progress"]) == 2
    assert "empty" in capsys.readouterr().err
