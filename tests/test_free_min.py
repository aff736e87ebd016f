"""free_min.py: the [CLS]-only exit layer, the losses' reach, and the early-exit forward."""
import pytest
import torch

import free_min
from free_min import FREE, ExitConfig, ExitLayer, early_exit_predict
from model import VLM, ModelConfig

T, A = 9, 6


def make_free(**exit_kw) -> FREE:
    """A random 6-layer VLM with exits (after layers 2 and 4 unless exit_layers says otherwise)."""
    exit_kw.setdefault("exit_layers", "2,4")
    torch.manual_seed(0)
    backbone = VLM(cfg=ModelConfig(image_size=32, patch_size=8, vit_dim=32, vit_heads=2, dim=32, depth=6, heads=2,
                                   max_text_len=T, vocab_size=40, num_answers=A)).eval()
    free = FREE(backbone, ExitConfig(**exit_kw))
    for p in free.exits.parameters():   # make exits differ from the backbone layers they were copied from
        p.data.add_(0.05 * torch.randn_like(p))
    return free.eval()


def inputs(n=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, T + 1, (n,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]          # (n, T)
    tokens = torch.randint(4, 40, (n, T), generator=g) * mask
    tokens[:, 0] = 2
    return torch.rand(n, 3, 32, 32, generator=g), tokens, mask


def test_exit_layers_default_and_validation():
    assert free_min.resolve_exit_layers("", 8) == [1, 2, 4, 6]
    assert free_min.resolve_exit_layers("", 2) == [1] and free_min.resolve_exit_layers("", 3) == [1, 2]
    assert free_min.resolve_exit_layers("3, 1", 8) == [1, 3]
    with pytest.raises(ValueError, match="'8' is not a layer between 1 and 7"):
        free_min.resolve_exit_layers("2,8", 8)


def test_cls_only_exit_layer_equals_full_layer_row():
    free = make_free()
    images, tokens, mask = inputs()
    h, attn_mask = free.backbone.embed(images, tokens, mask)
    block = free.backbone.blocks[3]
    full = block(h, attn_mask=attn_mask)[:, 0]                          # (B, D): the whole layer, row 0
    assert torch.allclose(ExitLayer(block)(h, attn_mask), full, atol=1e-5)


def test_threshold_that_never_fires_gives_the_full_model():
    free = make_free()
    images, tokens, mask = inputs(8)
    out = early_exit_predict(free, images, tokens, mask, rule="maxprob", threshold=1.01)
    full = free.backbone(images, tokens, mask)
    assert torch.equal(out["pred"], full.argmax(1))
    assert (out["exit"] == free.num_exits).all() and (out["layers"] == 6).all()


def test_threshold_that_always_fires_exits_everything_at_the_first_exit():
    free = make_free()
    images, tokens, mask = inputs(8)
    out = early_exit_predict(free, images, tokens, mask, rule="maxprob", threshold=0.0)
    states, attn_mask = free.backbone.hidden_states(images, tokens, mask)
    first = free.exit_logits(0, free.exit_feature(0, states[free.exit_layers[0]], attn_mask))
    assert (out["exit"] == 0).all() and (out["layers"] == free.exit_layers[0]).all()
    assert torch.equal(out["pred"], first.argmax(1))


def median_threshold(free, images, tokens, mask, rule):
    """A threshold that lets about half of the samples leave at the first exit."""
    states, attn_mask = free.backbone.hidden_states(images, tokens, mask)
    p = free.exit_logits(0, free.exit_feature(0, states[free.exit_layers[0]], attn_mask)).softmax(1)
    score = p.max(1).values if rule == "maxprob" else -(p * p.log()).sum(1) / torch.log(torch.tensor(float(A)))
    v = score.sort().values
    return ((v[len(v) // 2 - 1] + v[len(v) // 2]) / 2).item()   # half-way between two samples: no float ties


@pytest.mark.parametrize("rule", ["maxprob", "entropy", "patience"])
def test_batched_removal_equals_one_sample_at_a_time(rule):
    free = make_free()
    images, tokens, mask = inputs(12, seed=3)
    threshold = 2 if rule == "patience" else median_threshold(free, images, tokens, mask, rule)
    out = early_exit_predict(free, images, tokens, mask, rule=rule, threshold=threshold)
    if rule != "patience":  # (patience's own test below covers where samples leave)
        assert len(set(out["exit"].tolist())) > 1, "the test needs samples leaving at different exits"
    for i in range(12):
        n = int(mask[i].sum())
        one = early_exit_predict(free, images[i:i + 1], tokens[i:i + 1, :n], mask[i:i + 1, :n], rule=rule,
                                 threshold=threshold)
        assert one["pred"].item() == out["pred"][i].item() and one["exit"].item() == out["exit"][i].item()
        assert one["confidence"].item() == pytest.approx(out["confidence"][i].item(), abs=1e-5)


@pytest.mark.parametrize("rule", ["maxprob", "entropy", "patience"])
def test_early_exit_on_a_subset_of_exits_matches_the_simulation(rule):
    """early_exit_predict(exits=...) evaluates only those exits: where each sample leaves and its answer are
    what infer.simulate predicts from every exit's probabilities, and an exit left out is never used."""
    import infer
    free = make_free(exit_layers="1,2,3,4")
    images, tokens, mask = inputs(12, seed=3)
    with torch.no_grad():
        out = free.all_outputs(images, tokens, mask)
    probs = {"exits": torch.stack([e.softmax(1) for e in out["exits"]]), "final": out["final"].softmax(1)}
    threshold = 2 if rule == "patience" else median_threshold(free, images, tokens, mask, rule)
    for exits in ([0, 2], [1, 3], [3]):
        real = early_exit_predict(free, images, tokens, mask, rule=rule, threshold=threshold, exits=exits)
        sim = infer.simulate(probs, rule, threshold, exits)
        assert torch.equal(real["exit"], sim["exit"]) and torch.equal(real["pred"], sim["pred"])
        assert set(real["exit"].tolist()) <= set(exits) | {free.num_exits}
        assert torch.equal(real["layers"], torch.tensor(free.exit_layers + [6])[sim["exit"]])


def test_patience_semantics():
    free = make_free()
    images, tokens, mask = inputs(10)
    states, attn_mask = free.backbone.hidden_states(images, tokens, mask)
    answers = torch.stack([free.exit_logits(k, free.exit_feature(k, states[l], attn_mask)).argmax(1)
                           for k, l in enumerate(free.exit_layers)])            # (K, B)
    out = early_exit_predict(free, images, tokens, mask, rule="patience", threshold=2)
    for b in range(10):
        # the first exit k >= 1 whose answer equals exit k-1's answer, else the final layer
        expected = next((k for k in range(1, free.num_exits) if answers[k, b] == answers[k - 1, b]), free.num_exits)
        assert out["exit"][b].item() == expected
    assert (early_exit_predict(free, images, tokens, mask, rule="patience", threshold=1)["exit"] == 0).all()


def test_discriminator_step_changes_only_d_and_generator_step_only_exits():
    free = make_free(exit_method="free", label_fraction=1.0)
    images, tokens, mask = inputs(8)
    free.train()
    snapshot = lambda mod: [p.detach().clone() for p in mod.parameters()]
    states, attn_mask = free.backbone.hidden_states(images, tokens, mask)
    fakes = [free.exit_feature(k, states[l], attn_mask) for k, l in enumerate(free.exit_layers)]
    before = {"backbone": snapshot(free.backbone), "exits": snapshot(free.exits), "discs": snapshot(free.discs)}
    changed = lambda name: any(not torch.equal(a, b) for a, b in zip(before[name], getattr(free, name).parameters()))

    opt_d = torch.optim.SGD(free.discs.parameters(), lr=0.1)
    opt_g = torch.optim.SGD(free.generator_parameters(), lr=0.1)
    conds = [states[l][:, 0] for l in free.exit_layers]
    d_loss, _ = free_min.discriminator_loss(free, states[-1][:, 0], fakes, conds)
    opt_d.zero_grad()
    d_loss.backward()
    opt_d.step()
    assert changed("discs") and not changed("exits") and not changed("backbone")

    before["discs"] = snapshot(free.discs)
    final_logits = free.backbone.head(states[-1][:, 0])
    g_loss, stats = free_min.generator_loss(free, fakes, final_logits, None, torch.zeros(8, dtype=torch.bool),
                                            states[-1][:, 0], conds, 1.0)
    assert stats["adv"] > 0 and stats["kd"] > 0 and stats["ce"] == 0
    opt_g.zero_grad()
    g_loss.backward()
    opt_g.step()
    assert changed("exits") and not changed("discs") and not changed("backbone")


def test_methods_use_only_their_terms():
    images, tokens, mask = inputs(6)
    targets = torch.softmax(torch.randn(6, A), 1)
    labelled = torch.tensor([True, False, True, False, False, True])
    for method, on in [("free", {"adv", "kd", "ce"}), ("kd", {"kd"}), ("ce", {"ce"})]:
        free = make_free(exit_method=method)
        states, attn_mask = free.backbone.hidden_states(images, tokens, mask)
        fakes = [free.exit_feature(k, states[l], attn_mask) for k, l in enumerate(free.exit_layers)]
        conds = [states[l][:, 0] for l in free.exit_layers]
        _, stats = free_min.generator_loss(free, fakes, free.backbone.head(states[-1][:, 0]), targets, labelled,
                                           states[-1][:, 0], conds, 1.0)
        assert {k for k in ("adv", "kd", "ce") if stats[k] > 0} == on, method


def test_exits_saved_for_other_layers_are_refused_with_the_reason():
    saved = {k: v for k, v in make_free(exit_layers="1,3,5").state_dict().items() if not k.startswith("backbone.")}
    with pytest.raises(ValueError, match=r"do not match their config \(exits after layers \[2, 4\]\)"):
        make_free().load_exits(saved)
    make_free(exit_layers="1,3,5").load_exits(saved)


def test_own_heads_and_per_exit_discriminators():
    free = make_free(exit_head="own", disc="per-exit")
    assert len(free.heads) == free.num_exits == len(free.discs) == 2   # exits after layers 2 and 4 of 6
    images, tokens, mask = inputs(4)
    out = early_exit_predict(free, images, tokens, mask, threshold=0.0)
    assert out["pred"].shape == (4,)


def test_discriminator_loss_averages_the_fake_term_over_the_exits():
    """With one shared D, K copies of the same fake feature weigh as much as one (the fake term is a mean over
    the exits: summed, K fakes would outweigh the single real term K to 1)."""
    free = make_free(exit_layers="1,2,3")
    real, fake = torch.randn(8, 32), torch.randn(8, 32)
    cond = torch.randn(8, 32)
    one, _ = free_min.discriminator_loss(free, real, [fake], [cond])
    three, _ = free_min.discriminator_loss(free, real, [fake, fake, fake], [cond, cond, cond])
    assert three.item() == pytest.approx(one.item(), rel=1e-6)
    d = free.discs[0]
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    norm = free.backbone.norm
    by_hand = bce(d(norm(real)), torch.ones(8)) + bce(d(norm(fake)), torch.zeros(8))
    assert one.item() == pytest.approx(by_hand.item(), rel=1e-6)


def test_per_exit_discriminators_each_see_the_real_term_and_their_own_fake():
    free = make_free(exit_layers="1,2", disc="per-exit")
    real, fakes = torch.randn(8, 32), [torch.randn(8, 32), torch.randn(8, 32)]
    loss, _ = free_min.discriminator_loss(free, real, fakes, [torch.randn(8, 32)] * 2)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    norm = free.backbone.norm
    by_hand = sum(bce(free.discs[k](norm(real)), torch.ones(8)) + bce(free.discs[k](norm(fakes[k])), torch.zeros(8))
                  for k in range(2))
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-6)


def test_conditional_discriminator_judges_the_pair():
    """--disc-input pair: D reads the exit's input feature too (its logit depends on it); the paper's D does not."""
    real, cond, other = torch.randn(8, 32), torch.randn(8, 32), torch.randn(8, 32)
    pair, plain = make_free(disc_input="pair"), make_free()
    assert pair.discs[0].body[0].in_features == 64 and plain.discs[0].body[0].in_features == 32
    d = lambda free, c: free.discs[0](free_min.disc_input(free, real, c))
    assert not torch.allclose(d(pair, cond), d(pair, other)) and torch.equal(d(plain, cond), d(plain, other))


def test_feature_matching_is_zero_when_the_exit_matches_the_final_layer():
    free = make_free(adv_loss="fm")
    real, cond = torch.randn(8, 32), torch.randn(8, 32)
    assert free_min.adversarial_term(free, 0, real.clone(), real, cond).item() == 0.0
    fake = (real + 0.5 * torch.randn(8, 32)).requires_grad_(True)
    fm = free_min.adversarial_term(free, 0, fake, real, cond)
    fm.backward()
    assert fm.item() > 0 and fake.grad.abs().sum() > 0


def test_r1_penalty_adds_the_real_inputs_gradient_norm():
    real, fakes, conds = torch.randn(8, 32), [torch.randn(8, 32)], [torch.randn(8, 32)]
    plain, r1 = make_free(), make_free(disc_reg="r1", disc_reg_weight=4.0)
    base, _ = free_min.discriminator_loss(plain, real, fakes, conds)
    penalised, _ = free_min.discriminator_loss(r1, real, fakes, conds)       # same D weights (same seed)
    x = free_min.disc_input(r1, real, conds[0]).detach().requires_grad_(True)
    grad, = torch.autograd.grad(r1.discs[0](x).sum(), x)
    assert penalised.item() == pytest.approx(base.item() + 4.0 / 2 * grad.pow(2).sum(1).mean().item(), rel=1e-5)


def test_instance_noise_only_while_training():
    free = make_free(disc_reg="noise", disc_reg_weight=0.5)
    feat, cond = torch.randn(8, 32), torch.randn(8, 32)
    assert torch.equal(free_min.disc_input(free.eval(), feat, cond), free_min.disc_input(free, feat, cond))
    free.train()
    noisy = free_min.disc_input(free, feat, cond) - free.backbone.norm(feat)
    assert 0.4 < noisy.std().item() < 0.6


def test_inference_copy_folds_the_stem_and_gives_the_same_answers():
    """The copy that the report times: no BatchNorm left in the conv stem, channels-last conv weights, the same
    logits at every exit and at the final layer as the trained model (BN with non-trivial running statistics),
    and the original left untouched."""
    free = make_free()
    with torch.no_grad():
        for bn in [m for m in free.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]:
            bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.2, 0.2)
    copied = free_min.inference_copy(free)
    convs = [m for m in copied.backbone.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and not any(isinstance(m, torch.nn.BatchNorm2d) for m in copied.modules())
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs if c.kernel_size != (1, 1))
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in free.modules())
    images, tokens, mask = inputs()
    with torch.no_grad():
        a, b = free.all_outputs(images, tokens, mask), copied.all_outputs(images, tokens, mask)
    assert torch.allclose(a["final"], b["final"], atol=1e-4)
    assert all(torch.allclose(x, y, atol=1e-4) for x, y in zip(a["exits"], b["exits"]))
