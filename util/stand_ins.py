"""Stage 1's stand-ins for what a pretrained BLIP-2 brings: extra losses beside the answer's.

The paper starts FREE from BLIP-2, whose encoder was pretrained on web-scale data and whose language
model arrives knowing how to reason about a scene. Ours are trained from scratch in stage 1
(train.py), so stage 1 adds auxiliary heads whose losses stand in for that pretraining; they are
dropped afterwards and stage 2 never sees them. Each is a deviation from the paper, and RESULTS.md
shows what it buys.
  * PatchProbe: shapes data's pixel labels teach the encoder what is where;
  * AnswerShortcut and PatchDecoder: the same without labels (--aux-weight 0, or VQA v2);
  * SceneHeads: the scene facts behind each answer teach the language model its intermediate steps.

Public: LABEL_FREE, PatchProbe, PatchDecoder, AnswerShortcut, SceneHeads, aux_heads, aux_inputs.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from util.shapes import COLORS, FACTS, SHAPES, fact_classes
from model import VLM, soft_cross_entropy

# --------------------------------------------------------------------------------------------------
# Stage 1's auxiliary losses: a stand-in for a pretrained image encoder
# --------------------------------------------------------------------------------------------------
# NOTE (deviation): BLIP-2 starts from a ViT pretrained on web-scale data, whose tokens already say
# what is where. Ours is trained from scratch on answers, which reach a visual token only through
# every language-model layer and an attention that starts out spread evenly: for thousands of steps
# every token is told the same thing, and the encoder is slow to learn shapes. Stage 1 therefore
# trains an auxiliary head beside the VLM (dropped afterwards): on shapes data, the pixel labels of
# the generator (PatchProbe); without them (--aux-weight 0, or VQA v2), the label-free aids below,
# with these fixed settings (RESULTS.md):
LABEL_FREE = {"shortcut": 3.0,           # weight of AnswerShortcut's answer loss
              "decoder": 1.0,            # weight of PatchDecoder's pixel reconstruction loss
              # the encoder's transformer blocks train at 0.3 x the learning rate
              "vit_blocks_lr": 0.3}


class PatchProbe(nn.Module):
    """A linear read-out of every ViT token -> the colour and shape that cover its patch (pixel
    labels)."""

    def __init__(self, vit_dim: int):
        super().__init__()
        self.colour = nn.Linear(vit_dim, len(COLORS) + 1)   # + background
        self.shape = nn.Linear(vit_dim, len(SHAPES) + 1)

    def loss(self, patches: torch.Tensor, batch: dict) -> torch.Tensor:
        """patches (B, P, Dv); batch['pixel_labels'] (B, 2, H, W) uint8 -> summed cross-entropy."""
        total = 0.0
        for channel, head in ((0, self.colour), (1, self.shape)):
            target = self.targets(batch["pixel_labels"], batch["patch_size"], channel)      # (B, P)
            logits = head(patches.float())                                               # (B, P, C)
            total = total + F.cross_entropy(logits.flatten(0, 1), target.flatten())
        return total

    @staticmethod
    def targets(pixel_labels: torch.Tensor, patch_size: int, channel: int) -> torch.Tensor:
        """(B, 2, H, W) -> (B, P): the class of `channel` (0 colour, 1 shape) covering at least a
        quarter of each patch (the most common such one), else 0 = background."""
        classes = 1 + (len(COLORS) if channel == 0 else len(SHAPES))
        onehot = F.one_hot(pixel_labels[:, channel].long(), classes)                  # (B, H, W, C)
        cover = F.avg_pool2d(onehot.permute(0, 3, 1, 2).float(), patch_size)          # (B, C, g, g)
        cover[:, 0] = 0.0                                                # background never "covers"
        frac, label = cover.max(dim=1)                                                   # (B, g, g)
        return torch.where(frac >= 0.25, label, torch.zeros_like(label)).flatten(1)         # (B, P)


class PatchDecoder(nn.Module):
    """Label-free: every ViT token predicts the pixels of its own patch (averaged down to r x r),
    so that tokens describe their patch from the first steps. It teaches colour more than shape
    (RESULTS.md)."""

    def __init__(self, vit_dim: int, patch_size: int):
        super().__init__()
        self.r = min(4, patch_size)
        self.pixels = nn.Linear(vit_dim, 3 * self.r * self.r)

    def loss(self, patches: torch.Tensor, batch: dict) -> torch.Tensor:
        """patches (B, P, Dv); batch['pixels'] (B, 3, H, W), normalised as the encoder sees them
        -> MSE."""
        images, p, r = batch["pixels"].float(), batch["patch_size"], self.r
        B, g = images.shape[0], images.shape[-1] // p
        target = F.avg_pool2d(images, p // r)                                     # (B, 3, g*r, g*r)
        target = target.view(B, 3, g, r, g, r).permute(0, 2, 4, 1, 3, 5)        # (B, g, g, 3, r, r)
        target = target.reshape(B, g * g, 3 * r * r)                                 # (B, P, 3r^2)
        return F.mse_loss(self.pixels(patches.float()), target)


class AnswerShortcut(nn.Module):
    """Label-free: the answer predicted a second time straight from the ViT tokens by a one-layer
    head (their mean, a pooling by the question's words, and a bag of those words into an MLP),
    on the VLM's targets, as the auxiliary classifiers of deep supervision do: the answer's
    gradient is then one layer away."""

    def __init__(self, vit_dim: int, vocab_size: int, num_answers: int, hidden: int = 256):
        super().__init__()
        self.words = nn.Embedding(vocab_size, vit_dim)
        self.query = nn.Linear(vit_dim, vit_dim)
        self.mlp = nn.Sequential(nn.Linear(3 * vit_dim, hidden), nn.GELU(),
                                 nn.Linear(hidden, num_answers))

    def forward(self, patches: torch.Tensor, tokens: torch.Tensor,
                text_mask: torch.Tensor) -> torch.Tensor:
        """patches (B, P, Dv), tokens (B, T), text_mask (B, T) -> logits (B, A)."""
        x = F.layer_norm(patches.float(), patches.shape[-1:])                           # (B, P, Dv)
        m = text_mask[..., None].float()                                                 # (B, T, 1)
        q = (self.words(tokens) * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)   # (B, Dv) bag of words
        scores = torch.einsum("bpd,bd->bp", x, self.query(q)) / x.shape[-1] ** 0.5          # (B, P)
        pooled = torch.einsum("bp,bpd->bd", scores.softmax(dim=1), x)                      # (B, Dv)
        return self.mlp(torch.cat([x.mean(dim=1), pooled, q], dim=1))                       # (B, A)

    def loss(self, patches: torch.Tensor, batch: dict) -> torch.Tensor:
        return soft_cross_entropy(self(patches, batch["tokens"], batch["text_mask"]),
                                  batch["targets"])


# NOTE (deviation): scene supervision of the language model, the counterpart of PatchProbe for the
# layers above the encoder. Relational questions ("what colour is the object closest to the red
# square?", "are there fewer circles than squares?") are answered from intermediate facts: where the
# reference and the target are, how many there are of each group. From answers alone a small
# transformer finds these only after millions of questions (RESULTS.md); a pretrained BLIP-2 arrives
# knowing them. SceneHeads reads the facts (data.FACTS) off the final layer's [CLS] feature h_L,
# beside the answer, and adds their cross-entropy to stage 1's loss. Where they are read is a choice
# with a consequence: read after a middle layer, they would make the model finish the relation
# there, and so decide where hard questions can first be answered. Read after the last layer, they
# say nothing of where in depth it is computed: that is left to the model (and read after middle
# layers they were also learned far slower, RESULTS.md).
class SceneHeads(nn.Module):
    """Linear read-outs of each scene fact (data.FACTS) from the final layer's [CLS] feature h_L."""

    def __init__(self, dim: int):
        super().__init__()
        self.heads = nn.ModuleDict({name: nn.Linear(dim, fact_classes(name)) for name in FACTS})

    def logits(self, h_cls: torch.Tensor) -> dict[str, torch.Tensor]:
        """h_L[CLS] (B, D) -> fact name -> logits (B, classes)."""
        return {name: head(h_cls.float()) for name, head in self.heads.items()}

    def loss(self, patches: torch.Tensor, batch: dict) -> torch.Tensor:
        """batch['states'] h_0..h_L, batch['facts'] (B, len(FACTS)) with -1 = absent -> the mean
        over the batch of each question's summed cross-entropy over the facts it has (0 for a
        question with none), so that a question's facts weigh beside its answer as they would if
        every question had facts (averaged over the few questions that have them, they drowned
        the answers' gradient, RESULTS.md)."""
        facts = batch["facts"]                                                       # (B, F)
        total = facts.new_zeros((), dtype=torch.float32)
        for j, (name, logits) in enumerate(self.logits(batch["states"][-1][:, 0]).items()):
            # (B,)
            per_question = F.cross_entropy(logits, facts[:, j].clamp(min=0), reduction="none")
            total = total + (per_question * (facts[:, j] >= 0)).sum() / len(facts)
        return total


def aux_heads(model: VLM, split, tcfg) -> dict:
    """The auxiliary heads stage 1 trains, name -> (weight, head): PatchProbe where there are
    pixel labels and --aux-weight > 0, else the label-free aids (neither when the encoder is
    frozen: they could not teach it); and SceneHeads where the data has scene facts and
    --scene-weight > 0."""
    cfg, dv = model.cfg, model.vit.embed_dim
    if cfg.freeze_vit:
        heads = {}
    elif split.pixel_labels is not None and tcfg.aux_weight > 0:
        heads = {"probe": (tcfg.aux_weight, PatchProbe(dv))}
    else:
        heads = {
            "shortcut": (
                LABEL_FREE["shortcut"],
                AnswerShortcut(dv, cfg.vocab_size, cfg.num_answers),
            ),
            "decoder": (LABEL_FREE["decoder"], PatchDecoder(dv, cfg.patch_size)),
        }
    if split.facts is not None and tcfg.scene_weight > 0:
        heads["scene"] = (tcfg.scene_weight, SceneHeads(cfg.dim))
    return heads


def aux_inputs(model: VLM, split, ids: torch.Tensor, images: torch.Tensor | None) -> dict:
    """What the heads read beside the model's inputs, for questions `ids` of `split`, on the
    model's device: 'pixels' (B, 3, H, W) normalised as the encoder sees them, 'pixel_labels'
    (B, 2, H, W) and 'facts' (B, len(FACTS)) (each None where the data has none), 'patch_size'."""
    device = model.pixel_mean.device
    pixels = None if images is None else (images - model.pixel_mean) / model.pixel_std
    labels = (None if split.pixel_labels is None
              else split.pixel_labels[split.image_index[ids]].to(device))
    facts = None if split.facts is None else split.facts[ids].to(device)
    return {
        "pixels": pixels,
        "pixel_labels": labels,
        "facts": facts,
        "patch_size": model.cfg.patch_size,
    }
