"""free_min.py: the [CLS]-only exit layer, the losses' reach, and the early-exit forward."""
import pytest
import torch

from model import VLM, ModelConfig
import free_min
from free_min import FREE, ExitConfig, ExitLayer, early_exit_predict
from util import runtime

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


def test_exit_layer_starts_as_the_next_backbone_layer_on_the_cls_row():
    """G_k is a trainable copy of the layer after the exit, computing the [CLS] row only: at step 0 its feature
    is that layer's row 0 (on padded questions too), and training it leaves the backbone's layer alone."""
    free = make_free()
    images, tokens, mask = inputs()
    h, attn_mask = free.backbone.embed(images, tokens, mask)
    block = free.backbone.blocks[3]
    exit_layer = ExitLayer(block)
    assert torch.allclose(exit_layer(h, attn_mask), block(h, attn_mask)[:, 0], atol=1e-5)   # (B, D)
    assert all(p.requires_grad for p in exit_layer.parameters()) and not any(p.requires_grad for p in block.parameters())


def test_threshold_that_never_fires_gives_the_full_model():
    free = make_free()
    images, tokens, mask = inputs(8)
    out = early_exit_predict(free, {"images": images, "tokens": tokens, "text_mask": mask}, rule="maxprob", threshold=1.01)
    full = free.backbone(images, tokens, mask)
    assert torch.equal(out["pred"], full.argmax(1))
    assert (out["exit"] == free.num_exits).all() and (out["layers"] == 6).all()


def test_threshold_that_always_fires_exits_everything_at_the_first_exit():
    free = make_free()
    images, tokens, mask = inputs(8)
    out = early_exit_predict(free, {"images": images, "tokens": tokens, "text_mask": mask}, rule="maxprob", threshold=0.0)
    states, attn_mask = free.backbone.hidden_states(images, tokens, mask)
    first = free.exit_logits(0, states[free.exit_layers[0]], attn_mask)
    assert (out["exit"] == 0).all() and (out["layers"] == free.exit_layers[0]).all()
    assert torch.equal(out["pred"], first.argmax(1))


def median_threshold(free, images, tokens, mask, rule):
    """A threshold that lets about half of the samples leave at the first exit."""
    states, attn_mask = free.backbone.hidden_states(images, tokens, mask)
    p = free.exit_logits(0, states[free.exit_layers[0]], attn_mask).softmax(1)
    score = p.max(1).values if rule == "maxprob" else -(p * p.log()).sum(1) / torch.log(torch.tensor(float(A)))
    v = score.sort().values
    return ((v[len(v) // 2 - 1] + v[len(v) // 2]) / 2).item()   # half-way between two samples: no float ties


@pytest.mark.parametrize("rule", ["maxprob", "entropy", "patience"])
def test_batched_removal_equals_one_sample_at_a_time(rule):
    free = make_free()
    images, tokens, mask = inputs(12, seed=3)
    threshold = 2 if rule == "patience" else median_threshold(free, images, tokens, mask, rule)
    out = early_exit_predict(free, {"images": images, "tokens": tokens, "text_mask": mask}, rule=rule, threshold=threshold)
    if rule != "patience":  # (patience's own test below covers where samples leave)
        assert len(set(out["exit"].tolist())) > 1, "the test needs samples leaving at different exits"
    for i in range(12):
        n = int(mask[i].sum())
        one = early_exit_predict(free, {"images": images[i:i + 1], "tokens": tokens[i:i + 1, :n], "text_mask": mask[i:i + 1, :n]}, rule=rule,
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
        real = early_exit_predict(free, {"images": images, "tokens": tokens, "text_mask": mask}, rule=rule, threshold=threshold, exits=exits)
        sim = infer.simulate(probs, rule, threshold, exits)
        assert torch.equal(real["exit"], sim["exit"]) and torch.equal(real["pred"], sim["pred"])
        assert set(real["exit"].tolist()) <= set(exits) | {free.num_exits}
        assert torch.equal(real["layers"], torch.tensor(free.exit_layers + [6])[sim["exit"]])


def test_patience_semantics():
    free = make_free()
    images, tokens, mask = inputs(10)
    states, attn_mask = free.backbone.hidden_states(images, tokens, mask)
    answers = torch.stack([free.exit_logits(k, states[l], attn_mask).argmax(1)
                           for k, l in enumerate(free.exit_layers)])            # (K, B)
    out = early_exit_predict(free, {"images": images, "tokens": tokens, "text_mask": mask}, rule="patience", threshold=2)
    for b in range(10):
        # the first exit k >= 1 whose answer equals exit k-1's answer, else the final layer
        expected = next((k for k in range(1, free.num_exits) if answers[k, b] == answers[k - 1, b]), free.num_exits)
        assert out["exit"][b].item() == expected
    assert (early_exit_predict(free, {"images": images, "tokens": tokens, "text_mask": mask}, rule="patience", threshold=1)["exit"] == 0).all()


def exit_features(free, images, tokens, mask):
    states, attn_mask = free.backbone.hidden_states(images, tokens, mask)
    return states[-1][:, 0], [free.exit_feature(k, states[l], attn_mask) for k, l in enumerate(free.exit_layers)]


def test_discriminator_step_changes_only_d_and_generator_step_only_exits():
    free = make_free(exit_method="free", label_fraction=1.0)
    images, tokens, mask = inputs(8)
    free.train()
    snapshot = lambda mod: [p.detach().clone() for p in mod.parameters()]
    real, fakes = exit_features(free, images, tokens, mask)
    before = {"backbone": snapshot(free.backbone), "exits": snapshot(free.exits), "disc": snapshot(free.disc)}
    changed = lambda name: any(not torch.equal(a, b) for a, b in zip(before[name], getattr(free, name).parameters()))

    opt_d = torch.optim.SGD(free.disc.parameters(), lr=0.1)
    opt_g = torch.optim.SGD(free.exits.parameters(), lr=0.1)
    d_loss, _ = free_min.discriminator_loss(free, real, fakes)
    opt_d.zero_grad()
    d_loss.backward()
    opt_d.step()
    assert changed("disc") and not changed("exits") and not changed("backbone")

    before["disc"] = snapshot(free.disc)
    g_loss, stats = free_min.generator_loss(free, real, fakes, None, torch.zeros(8, dtype=torch.bool))
    assert {"adv", "kd", "ce"} <= set(stats)                     # every term reported, though no label was read
    assert stats["adv"] > 0 and stats["kd"] > 0 and stats["ce"] == 0
    opt_g.zero_grad()
    g_loss.backward()
    opt_g.step()
    assert changed("exits") and not changed("disc") and not changed("backbone")


@pytest.mark.parametrize("adv_loss", ["gan", "fm"])
def test_methods_use_only_their_terms(adv_loss):
    images, tokens, mask = inputs(6)
    targets = torch.softmax(torch.randn(6, A), 1)
    labelled = torch.tensor([True, False, True, False, False, True])
    for method, on in [("free", {"adv", "kd", "ce"}), ("kd", {"kd"}), ("ce", {"ce"})]:
        free = make_free(exit_method=method, adv_loss=adv_loss)
        real, fakes = exit_features(free, images, tokens, mask)
        _, stats = free_min.generator_loss(free, real, fakes, targets, labelled)
        assert {k for k in ("adv", "kd", "ce") if k in stats and stats[k] > 0} == on, method


def test_generator_loss_is_the_weighted_sum_of_its_terms_by_hand():
    """L_G = sum_k [lambda_adv ADV_k + lambda_kd KD_k + lambda_ce CE_k], CE on the labelled rows only."""
    images, tokens, mask = inputs(6)
    targets = torch.softmax(torch.randn(6, A), 1)
    labelled = torch.tensor([True, False, True, False, False, True])
    free = make_free(adv_loss="gan", lambda_adv=0.5, lambda_kd=2.0, lambda_ce=3.0, temperature=1.5)
    real, fakes = exit_features(free, images, tokens, mask)
    loss, _ = free_min.generator_loss(free, real, fakes, targets, labelled)
    head, final = free.backbone.head, free.backbone.head(real)
    by_hand = sum(0.5 * free_min.gan_term(free, f, real) + 2.0 * free_min.distillation_loss(head(f), final, 1.5)
                  + 3.0 * free_min.soft_cross_entropy(head(f)[labelled], targets[labelled]) for f in fakes)
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)


def test_exits_saved_for_other_layers_are_refused_with_the_reason():
    saved = {k: v for k, v in make_free(exit_layers="1,3,5").state_dict().items() if not k.startswith("backbone.")}
    with pytest.raises(ValueError, match=r"do not match their config \(exits after layers \[2, 4\]\)"):
        make_free().load_exits(saved)
    make_free(exit_layers="1,3,5").load_exits(saved)


def test_discriminator_loss_is_the_papers_with_the_fake_term_averaged_over_the_exits():
    """L_D = BCE(D(h_L), 1) + mean_k BCE(D(G_k), 0) on normed features: K copies of one fake feature weigh as
    much as one (summed, K fakes would outweigh the single real term K to 1)."""
    free = make_free(exit_layers="1,2,3")
    real, fake = torch.randn(8, 32), torch.randn(8, 32)
    one, _ = free_min.discriminator_loss(free, real, [fake])
    three, _ = free_min.discriminator_loss(free, real, [fake, fake, fake])
    assert three.item() == pytest.approx(one.item(), rel=1e-6)
    bce, d, norm = torch.nn.functional.binary_cross_entropy_with_logits, free.disc, free.backbone.norm
    by_hand = bce(d(norm(real)), torch.ones(8)) + bce(d(norm(fake)), torch.zeros(8))
    assert one.item() == pytest.approx(by_hand.item(), rel=1e-6)


def test_feature_matching_is_zero_when_the_exit_matches_the_final_layer():
    free = make_free(adv_loss="fm")
    real = torch.randn(8, 32)
    assert free_min.feature_matching_term(free, real.clone(), real).item() == 0.0
    fake = (real + 0.5 * torch.randn(8, 32)).requires_grad_(True)
    fm = free_min.feature_matching_term(free, fake, real)
    fm.backward()
    assert fm.item() > 0 and fake.grad.abs().sum() > 0


def test_rules_and_adversarial_terms_are_one_table_entry_each(monkeypatch):
    """A new exit rule is one entry of free_min.RULES: the early-exit forward and the simulation use it."""
    import infer
    rule = free_min.ExitRule(lambda conf, probs, streak: probs[:, 1], True, lambda K: [0.5], 0.5, (0, 1), "p(answer 1)")
    monkeypatch.setitem(free_min.RULES, "second", rule)              # leave when answer 1 is likely enough
    free = make_free(exit_layers="1,2,3,4")
    images, tokens, mask = inputs(12, seed=3)
    with torch.no_grad():
        out = free.all_outputs(images, tokens, mask)
    probs = {"exits": torch.stack([e.softmax(1) for e in out["exits"]]), "final": out["final"].softmax(1)}
    t = probs["exits"][0, :, 1].median().item()                     # about half leave at the first exit
    real = early_exit_predict(free, {"images": images, "tokens": tokens, "text_mask": mask}, rule="second", threshold=t)
    assert len(set(real["exit"].tolist())) > 1
    assert torch.equal(real["exit"], infer.simulate(probs, "second", t)["exit"])
    assert set(free_min.ADVERSARIAL) == {"gan", "fm"}


def test_inference_copy_folds_the_stem_and_gives_the_same_answers():
    """The copy that the report times: no BatchNorm left in the conv stem, channels-last conv weights, the same
    logits at every exit and at the final layer as the trained model (BN with non-trivial running statistics),
    and the original left untouched."""
    free = make_free()
    with torch.no_grad():
        for bn in [m for m in free.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]:
            bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.2, 0.2)
    copied = runtime.inference_copy(free)
    convs = [m for m in copied.backbone.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and not any(isinstance(m, torch.nn.BatchNorm2d) for m in copied.modules())
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs if c.kernel_size != (1, 1))
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in free.modules())
    images, tokens, mask = inputs()
    with torch.no_grad():
        a, b = free.all_outputs(images, tokens, mask), copied.all_outputs(images, tokens, mask)
    assert torch.allclose(a["final"], b["final"], atol=1e-4)
    assert all(torch.allclose(x, y, atol=1e-4) for x, y in zip(a["exits"], b["exits"]))
