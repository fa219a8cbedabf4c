"""Tests for sea_ray.sea: targets, sampling, loss, gather, schedules, diagnostics."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from sea_ray import sea
from sea_ray.sea import (
    SeaLoss,
    dedup_by_label,
    gather_features,
    lambda_at,
    modality_gap,
    nearest_word,
    sample_labels,
    tacs,
    window_patch_indices,
    word_targets,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _cos(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def _direction_loss(rows: list[list[float]], cols: list[list[float]], offset: int, tau: float):
    """Mean over rows i of -log(exp(s_i,i+offset / tau) / sum_j exp(s_ij / tau)), by loops."""
    total = 0.0
    for i, r in enumerate(rows):
        denom = 0.0
        for c in cols:
            denom += math.exp(_cos(r, c) / tau)
        total += -math.log(math.exp(_cos(r, cols[i + offset]) / tau) / denom)
    return total / len(rows)


# --------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------


def test_aligned_pairs_near_zero_shuffled_high():
    loss_fn = SeaLoss(init_temperature=0.01, min_temperature=0.005)
    x = torch.eye(8) * 3.0  # distinct, orthogonal directions
    aligned = loss_fn(x, x.clone())["loss"]
    shuffled = loss_fn(x, x[torch.roll(torch.arange(8), 1)])["loss"]
    assert aligned.item() < 1e-6
    assert shuffled.item() > 50.0


def test_symmetry_swapping_inputs():
    g = _gen(1)
    v, t = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    loss_fn = SeaLoss()
    a, b = loss_fn(v, t), loss_fn(t, v)
    torch.testing.assert_close(a["loss"], b["loss"])
    torch.testing.assert_close(a["loss_v2t"], b["loss_t2v"])
    assert not torch.allclose(a["loss_v2t"], a["loss_t2v"])  # the two directions differ here


def test_matches_hand_loop_eq11():
    v = [[1.0, 0.0, 0.5], [0.2, 1.0, 0.0], [0.0, -0.3, 2.0], [1.0, 1.0, 1.0]]
    t = [[0.9, 0.1, 0.4], [0.0, 2.0, 0.1], [0.3, 0.0, 1.0], [-1.0, 0.5, 0.2]]
    tau = 0.2
    out = SeaLoss(init_temperature=tau)(torch.tensor(v), torch.tensor(t))
    v2t = _direction_loss(v, t, 0, tau)
    t2v = _direction_loss(t, v, 0, tau)
    assert out["loss_v2t"].item() == pytest.approx(v2t, rel=1e-5)
    assert out["loss_t2v"].item() == pytest.approx(t2v, rel=1e-5)
    assert out["loss"].item() == pytest.approx((v2t + t2v) / 2, rel=1e-5)
    assert out["num_pairs"] == 4
    assert out["temperature"].item() == pytest.approx(tau, rel=1e-6)
    assert not out["temperature"].requires_grad


def test_gathered_path_matches_hand_loop():
    g = _gen(2)
    world = [torch.randn(n, 4, generator=g) for n in (3, 2, 4)]  # unequal rows per "rank"
    texts = [torch.randn(n, 4, generator=g) for n in (3, 2, 4)]
    all_v, all_t = torch.cat(world), torch.cat(texts)
    tau = 0.3
    loss_fn = SeaLoss(init_temperature=tau)
    offset = 3  # rank 1's rows start after rank 0's 3 rows
    out = loss_fn(world[1], texts[1], all_visual=all_v, all_targets=all_t, rank_offset=offset)
    v2t = _direction_loss(world[1].tolist(), all_t.tolist(), offset, tau)
    t2v = _direction_loss(texts[1].tolist(), all_v.tolist(), offset, tau)
    assert out["loss_v2t"].item() == pytest.approx(v2t, rel=1e-5)
    assert out["loss_t2v"].item() == pytest.approx(t2v, rel=1e-5)
    # Wrong offset scores against the wrong positives: a different number.
    wrong = loss_fn(world[1], texts[1], all_visual=all_v, all_targets=all_t, rank_offset=0)
    assert wrong["loss"].item() != pytest.approx(out["loss"].item(), rel=1e-3)
    with pytest.raises(ValueError):
        loss_fn(world[1], texts[1], all_visual=all_v, all_targets=all_t, rank_offset=8)
    with pytest.raises(ValueError):
        loss_fn(world[1], texts[1], all_visual=all_v)


def test_temperature_clamp_and_validation():
    loss_fn = SeaLoss(init_temperature=0.07, min_temperature=0.01, max_temperature=1.0)
    assert loss_fn.temperature == pytest.approx(0.07)
    assert loss_fn.clamp_().temperature == pytest.approx(0.07)  # inside the bounds: untouched
    with torch.no_grad():
        loss_fn.log_inv_temperature.fill_(math.log(1 / 0.001))
    x = torch.randn(4, 3, generator=_gen(3))
    assert loss_fn(x, x)["temperature"].item() == pytest.approx(0.001)  # used unclamped
    loss_fn.clamp_()  # the recipe's in-place clamp after an optimizer step
    assert loss_fn.temperature == pytest.approx(0.01)
    assert loss_fn(x, x)["temperature"].item() == pytest.approx(0.01)
    with torch.no_grad():
        loss_fn.log_inv_temperature.fill_(math.log(1 / 5.0))
    assert loss_fn.clamp_().temperature == pytest.approx(1.0)
    with pytest.raises(ValueError):
        SeaLoss(init_temperature=2.0)
    assert not SeaLoss(learnable=False).log_inv_temperature.requires_grad


def test_temperature_recovers_from_its_bound():
    """A temperature pushed onto a bound moves off it once the data asks (issue 12, item 8).

    Under the old clamp-on-use the parameter overshot the bound, got zero gradient and stayed."""
    torch.manual_seed(0)
    loss_fn = SeaLoss(init_temperature=0.9, min_temperature=0.01, max_temperature=1.0)
    opt = torch.optim.Adam(loss_fn.parameters(), lr=0.05)
    x = torch.randn(16, 8, generator=_gen(7))

    def step(targets):
        opt.zero_grad(set_to_none=True)
        loss_fn(x, targets)["loss"].backward()
        opt.step()
        loss_fn.clamp_()

    # Anti-aligned pairs: every positive is the least similar column, so the loss rises with the
    # logit scale and the temperature climbs to max_temperature.
    for _ in range(500):
        step(-x)
        if loss_fn.temperature == pytest.approx(1.0):
            break
    for _ in range(20):  # sit on the bound a while, momentum still pushing outwards
        step(-x)
    assert loss_fn.temperature == pytest.approx(1.0)
    # Aligned pairs (targets == features): a sharper softmax lowers the loss; the temperature must
    # leave the bound.
    for _ in range(300):
        step(x.clone())
    assert loss_fn.temperature < 0.5
    assert 0.01 <= loss_fn.temperature


@pytest.mark.parametrize("init", [0.01, 1.0, 0.005, 2.0])
def test_init_temperature_on_or_outside_a_bound_is_refused(init):
    from sea_ray.config.loading import validate
    from sea_ray.errors import ConfigError

    with pytest.raises(ValueError, match="min_temperature < init_temperature"):
        SeaLoss(init_temperature=init, min_temperature=0.01, max_temperature=1.0)
    raw = {"job": "align", "model": {"preset": "tiny-openclip-llama"},
           "data": {"manifest": "m.json", "labels": "labels"}, "batch": {"global_size": 16, "per_worker": 8},
           "sea": {"init_temperature": init, "min_temperature": 0.01, "max_temperature": 1.0}}
    with pytest.raises(ConfigError) as info:
        validate(raw)
    problems = [p for p in info.value.problems if p.startswith("sea.init_temperature:")]
    assert len(problems) == 1 and "0.01" in problems[0] and "1.0" in problems[0]
    # strictly inside is fine for both
    raw["sea"]["init_temperature"] = 0.07
    validate(raw)
    SeaLoss(init_temperature=0.07, min_temperature=0.01, max_temperature=1.0)


def test_fixed_temperature_may_sit_on_its_bounds():
    # tune validation pins its scoring temperature with min == init == max and learnable=False
    head = SeaLoss(init_temperature=0.1, min_temperature=0.1, max_temperature=0.1, learnable=False)
    assert head.clamp_().temperature == pytest.approx(0.1)
    with pytest.raises(ValueError):
        SeaLoss(init_temperature=0.2, min_temperature=0.01, max_temperature=0.1, learnable=False)


def test_gradient_reaches_temperature_and_inputs():
    loss_fn = SeaLoss()
    g = _gen(4)
    v = torch.randn(5, 3, generator=g, requires_grad=True)
    t = torch.randn(5, 3, generator=g)
    loss_fn(v, t)["loss"].backward()
    grad = loss_fn.log_inv_temperature.grad
    assert grad is not None and grad.abs().item() > 0
    assert v.grad is not None and v.grad.abs().sum().item() > 0


@pytest.mark.parametrize("n", [0, 1])
def test_degenerate_batches_give_zero_loss_with_grad(n):
    loss_fn = SeaLoss()
    v = torch.randn(n, 3, requires_grad=True)
    out = loss_fn(v, torch.randn(n, 3))
    assert out["loss"].item() == 0.0 and out["num_pairs"] == n
    out["loss"].backward()
    assert v.grad is not None and loss_fn.log_inv_temperature.grad is not None


def test_single_local_row_with_gathered_columns_is_a_real_loss():
    g = _gen(5)
    all_v, all_t = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    out = SeaLoss()(all_v[2:3], all_t[2:3], all_visual=all_v, all_targets=all_t, rank_offset=2)
    assert out["loss"].item() > 0


# --------------------------------------------------------------------------------------------
# Gather
# --------------------------------------------------------------------------------------------


def test_gather_fast_path_without_process_group():
    x = torch.randn(3, 2)
    gathered, offset = gather_features(x)
    assert gathered is x and offset == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gather_worker(rank: int, world: int, port: int, results) -> None:
    import torch.distributed as dist

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        counts = [2, 3]
        x = torch.full((counts[rank], 2), float(rank + 1), requires_grad=True)
        gathered, offset = gather_features(x)
        # Each rank weights every gathered row by (rank + 1); the summed loss has d/dx = 1 + 2.
        (gathered.sum() * (rank + 1)).backward()
        results[rank] = (gathered.detach().tolist(), offset, x.grad.tolist())
    finally:
        dist.destroy_process_group()


def test_gather_unequal_sizes_two_processes():
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_gather_worker, args=(2, _free_port(), results), nprocs=2, join=True)
    expected = [[1.0, 1.0]] * 2 + [[2.0, 2.0]] * 3
    for rank, offset in ((0, 0), (1, 2)):
        gathered, got_offset, grad = results[rank]
        assert gathered == expected
        assert got_offset == offset
        # Gradient flows back from both ranks' losses (sum of the two weights).
        assert grad == [[3.0, 3.0]] * (2 if rank == 0 else 3)


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


def _window_of(index: int, grid_w: int, k: int) -> tuple[int, int]:
    return (index // grid_w) // k, (index % grid_w) // k


def test_window_sampling_one_per_window_with_edges():
    h, w, k = 7, 7, 2
    seen: dict[int, set[int]] = {i: set() for i in range(16)}
    g = _gen(6)
    for _ in range(300):
        idx = window_patch_indices(h, w, k, g)
        assert idx.dtype == torch.long and idx.shape == (16,)
        for window, patch in enumerate(idx.tolist()):
            assert 0 <= patch < h * w
            assert _window_of(patch, w, k) == divmod(window, 4)
            seen[window].add(patch)
    for window in range(16):
        wr, wc = divmod(window, 4)
        members = {
            r * w + c
            for r in range(wr * k, min(wr * k + k, h))
            for c in range(wc * k, min(wc * k + k, w))
        }
        assert seen[window] == members
    assert len(seen[15]) == 1 and len(seen[3]) == 2  # corner and edge windows are partial


def test_window_sampling_non_square_and_validation():
    idx = window_patch_indices(3, 5, 2, _gen(7))
    assert idx.shape == (6,)  # 2 window rows x 3 window cols
    windows = [(r, c) for r in range(2) for c in range(3)]
    assert [_window_of(p, 5, 2) for p in idx.tolist()] == windows
    with pytest.raises(ValueError):
        window_patch_indices(4, 4, 0, _gen(7))


def test_label_sampling_follows_scores_and_skips_padding():
    label_ids = torch.tensor(
        [
            [10, 11, 12, 13, -1],
            [20, -1, 21, 22, 23],
            [30, 31, -1, -1, -1],
        ]
    )
    label_scores = torch.tensor(
        [
            [0.5, 0.3, 0.2, 0.0, 0.9],  # 13 has score 0; padding (-1) carries a score
            [0.1, 0.8, -0.4, 0.3, 0.6],  # 21 negative score never drawn
            [0.0, -1.0, 0.0, 0.0, 0.0],  # nothing valid
        ]
    )
    draws = 20000
    patch_idx = torch.tensor([0, 1, 2]).repeat(draws)
    out = sample_labels(label_ids, label_scores, patch_idx, _gen(8)).view(draws, 3)
    assert (out[:, 2] == -1).all()
    for column, expected in ((0, {10: 0.5, 11: 0.3, 12: 0.2}), (1, {20: 0.1, 22: 0.3, 23: 0.6})):
        values = out[:, column]
        assert set(values.unique().tolist()) == set(expected)
        chi2 = 0.0
        for label, p in expected.items():
            freq = (values == label).float().mean().item()
            assert freq == pytest.approx(p, abs=0.015)
            chi2 += draws * (freq - p) ** 2 / p
        assert chi2 < 13.8  # chi-square, 2 dof, p = 0.001


def test_label_sampling_deterministic_and_edge_shapes():
    ids = torch.tensor([[1, 2, 3], [4, 5, -1]])
    scores = torch.tensor([[1.0, 1.0, 1.0], [2.0, 1.0, 0.0]])
    patches = torch.tensor([0, 1, 1, 0, 1])
    a = sample_labels(ids, scores, patches, _gen(9))
    b = sample_labels(ids, scores, patches, _gen(9))
    assert torch.equal(a, b)
    assert sample_labels(ids, scores, torch.tensor([], dtype=torch.long), _gen(9)).shape == (0,)
    no_columns = torch.zeros(2, 0, dtype=torch.long)
    empty = sample_labels(no_columns, torch.zeros(2, 0), patches[:2], _gen(9))
    assert empty.tolist() == [-1, -1]


def test_dedup_keeps_one_random_element_per_label():
    labels = torch.tensor([5, 3, 5, -1, 3, 3, 7, -1])
    counts: dict[int, int] = {}
    g = _gen(10)
    for _ in range(400):
        keep = dedup_by_label(labels, g)
        assert keep.tolist() == sorted(keep.tolist())
        kept_labels = labels[keep].tolist()
        assert sorted(kept_labels) == [3, 5, 7]
        for i in keep.tolist():
            counts[i] = counts.get(i, 0) + 1
    assert set(counts) == {0, 1, 2, 4, 5, 6}  # every member of each group gets picked
    assert counts[6] == 400
    assert dedup_by_label(torch.tensor([-1, -1]), g).numel() == 0


def test_sampling_determinism_same_seed():
    def windows(seed: int) -> torch.Tensor:
        return window_patch_indices(9, 9, 2, _gen(seed))

    assert torch.equal(windows(11), windows(11))
    assert not torch.equal(windows(11), windows(12))

    ids, scores = torch.arange(40).view(4, 10), torch.rand(4, 10, generator=_gen(0))
    patches = torch.arange(4).repeat(5)

    def labels_drawn(seed: int) -> torch.Tensor:
        return sample_labels(ids, scores, patches, _gen(seed))

    assert torch.equal(labels_drawn(3), labels_drawn(3))
    assert not torch.equal(labels_drawn(3), labels_drawn(4))
    labels = torch.tensor([1, 1, 2, 2, 2, 3, 3])
    assert torch.equal(dedup_by_label(labels, _gen(13)), dedup_by_label(labels, _gen(13)))


# --------------------------------------------------------------------------------------------
# Word targets
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def byte_level_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    sentences = ["the dog runs in the park", "a red ball on the grass", "the cat sits on a mat"] * 5
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(sentences, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.fixture(scope="module")
def metaspace_tokenizer():
    """Sentencepiece-style: ' zebra' encodes as a lone '▁' then 'zebra'; 'x' is unknown."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "▁": 1, "z": 2, "e": 3, "b": 4, "r": 5, "a": 6, "ze": 7, "zeb": 8,
             "zebr": 9, "zebra": 10, "▁a": 11}  # fmt: skip
    merges = [("z", "e"), ("ze", "b"), ("zeb", "r"), ("zebr", "a"), ("▁", "a")]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first", split=False
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def test_word_targets_multi_token_mean(byte_level_tokenizer):
    hf = byte_level_tokenizer
    embedding = torch.randn(len(hf), 6, generator=_gen(14), dtype=torch.float64)
    ids = hf(" doggy", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1 and hf.convert_ids_to_tokens(ids)[0] == "Ġdog"
    targets, mapped, unmapped = word_targets(["dog", "", "doggy", "   "], hf, embedding)
    assert mapped == [0, 2] and unmapped == ["", "   "]
    assert targets.dtype == torch.float32 and targets.shape == (2, 6)
    torch.testing.assert_close(targets[1], embedding[ids].mean(0).float())
    dog = hf(" dog", add_special_tokens=False)["input_ids"]
    assert len(dog) == 1
    torch.testing.assert_close(targets[0], embedding[dog[0]].float())


def test_word_targets_drops_lone_space_token(byte_level_tokenizer, metaspace_tokenizer):
    # Byte-level: ' zebra' -> ['Ġ', 'z', 'e', 'b', 'r', 'a']; the lone 'Ġ' is dropped.
    hf = byte_level_tokenizer
    embedding = torch.randn(len(hf), 4, generator=_gen(15))
    ids = hf(" zebra", add_special_tokens=False)["input_ids"]
    assert hf.convert_ids_to_tokens(ids)[0] == "Ġ"
    targets, mapped, _ = word_targets(["zebra"], hf, embedding)
    torch.testing.assert_close(targets[0], embedding[ids[1:]].mean(0))
    # Sentencepiece-style: lone '▁' then 'zebra'; merged '▁a' is kept whole.
    sp = metaspace_tokenizer
    embedding = torch.randn(len(sp), 4, generator=_gen(16))
    zebra = sp(" zebra", add_special_tokens=False)["input_ids"]
    assert sp.convert_ids_to_tokens(zebra) == ["▁", "zebra"]
    targets, mapped, unmapped = word_targets(["zebra", "a", "zex"], sp, embedding)
    assert mapped == [0, 1] and unmapped == ["zex"]  # 'x' is the unk token
    torch.testing.assert_close(targets, embedding[[10, 11]])


def test_word_targets_out_of_range_is_unmapped(byte_level_tokenizer):
    hf = byte_level_tokenizer
    dog = hf(" dog", add_special_tokens=False)["input_ids"][0]
    small = torch.randn(dog, 3)  # the id of 'dog' is just past the last row
    targets, mapped, unmapped = word_targets(["dog"], hf, small)
    assert targets.shape == (0, 3) and mapped == [] and unmapped == ["dog"]


# --------------------------------------------------------------------------------------------
# Objective
# --------------------------------------------------------------------------------------------


def test_lambda_schedules():
    assert [lambda_at(s, 100, 0.5, "constant") for s in (0, 50, 100)] == [0.5, 0.5, 0.5]
    linear = [lambda_at(s, 100, 0.5, "linear") for s in (0, 50, 100)]
    assert linear == pytest.approx([0.5, 0.25, 0.0])
    assert [lambda_at(s, 100, 0.5, "cosine") for s in (0, 25, 50, 100)] == pytest.approx(
        [0.5, 0.5 * (1 + math.sqrt(0.5)) / 2, 0.25, 0.0]
    )
    assert lambda_at(150, 100, 0.5, "linear") == 0.0
    with pytest.raises(ValueError, match="constant"):
        lambda_at(0, 100, 0.5, "step")
    assert set(sea.SCHEDULES) == {"constant", "linear", "cosine"}


def test_pair_loss_picks_the_chosen_patches():
    from sea_ray.sea import pair_loss

    torch.manual_seed(0)
    visual = torch.randn(2, 6, 8)
    targets = torch.randn(3, 8)
    loss_fn = SeaLoss(init_temperature=0.1)
    pairs = (torch.tensor([0, 1, 1]), torch.tensor([4, 0, 5]), targets)
    got = pair_loss(loss_fn, visual, pairs)
    want = loss_fn(torch.stack([visual[0, 4], visual[1, 0], visual[1, 5]]), targets)
    assert got["num_pairs"] == 3 and torch.allclose(got["loss"], want["loss"])
    assert pair_loss(loss_fn, None, (torch.tensor([]), torch.tensor([]), targets[:0]))["num_pairs"] == 0


# --------------------------------------------------------------------------------------------
# Diagnostics
# --------------------------------------------------------------------------------------------


def test_nearest_word():
    vocab = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    visual = torch.tensor([[5.0, 0.1], [0.2, 3.0], [-2.0, 1.0], [-0.1, -9.0]])
    assert nearest_word(visual, vocab).tolist() == [0, 1, 2, 2]


def test_modality_gap():
    visual = torch.tensor([[2.0, 0.0], [5.0, 0.0]])  # centroid (1, 0)
    text = torch.tensor([[0.0, 3.0], [0.0, 0.5]])  # centroid (0, 1)
    assert modality_gap(visual, text) == pytest.approx(math.sqrt(2))
    assert modality_gap(visual, visual * 7) == pytest.approx(0.0)


def test_tacs():
    text = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    visual = torch.tensor(
        [
            [1.0, 0.0, 0.0],  # best 1
            [0.0, 0.0, 1.0],  # best 0
            [1.0, 1.0, 0.0],  # best sqrt(1/2)
            [0.0, -1.0, 0.0],  # best 0
        ]
    )
    assert tacs(visual, text, top_k=2) == pytest.approx((1 + math.sqrt(0.5)) / 2)
    assert tacs(visual, text, top_k=10) == pytest.approx((1 + math.sqrt(0.5)) / 4)


def test_select_pairs_one_per_window_distinct_labels_and_skips_unlabelled():
    from sea_ray.sea import select_pairs

    grid, k, n = (4, 4), 2, 3
    ids = torch.full((3, 16, n), -1, dtype=torch.long)
    scores = torch.zeros(3, 16, n)
    ids[0, :, 0] = torch.arange(16)  # image 0: every patch its own label
    scores[0, :, 0] = 1.0
    ids[1, :, 0] = 100  # image 1: one label everywhere -> dedup keeps one pair
    scores[1, :, 0] = 1.0
    # image 2: no labels at all -> contributes nothing
    gen = torch.Generator().manual_seed(0)
    img, patch, label = select_pairs(ids, scores, grid, k, gen)
    assert img.tolist().count(2) == 0
    assert img.tolist().count(1) == 1 and label[img == 1].tolist() == [100]
    zero = patch[img == 0]
    assert len(zero) == 4  # one per 2x2 window of a 4x4 grid
    windows = {(int(p) // 4 // 2, int(p) % 4 // 2) for p in zero}
    assert windows == {(0, 0), (0, 1), (1, 0), (1, 1)}
    assert torch.equal(label[img == 0], zero)  # label == patch id for image 0
    assert len(set(label.tolist())) == len(label)
