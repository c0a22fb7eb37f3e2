"""MULTI-LANE: one summarising pathway (lane) per task on a frozen ViT, for multi-label CIL.

De Min, Mancini, Lathuilière, Roy, Ricci, "Less is more: Summarizing Patch Tokens for
Efficient Multi-Label Class-Incremental Learning", Conference on Lifelong Learning Agents
(CoLLAs), PMLR 274, 2024 (arXiv 2405.15633); official code github.com/tdemin16/multi-lane
(``multi_lane/blocks.py``, ``multi_lane/vision_transformer.py``, ``multi_lane/engine.py``).

The ViT runs once, frozen, giving the tokens X^l (class token and N patch tokens) entering
every block l. Task t owns a lane: M learned patch selectors S_t (M x D), prefix prompts
(p^K_{t,l}, p^V_{t,l}) for the first L_p blocks, and a head for its classes. The lane carries its
own class token z_t and its selectors through the frozen blocks; in block l, with LN the
block's first norm:

  summary (patch selector):  P_t^l = softmax( LN(S_t^l) LN(X^l)^T / sqrt(D) ) LN(X^l)
  lane attention:            a_t^l = MSA_frozen( q = LN(z_t^l),
                                                 K = [p^K_{t,l}; W_K [LN(z_t^l); P_t^l]],
                                                 V = [p^V_{t,l}; W_V [LN(z_t^l); P_t^l]] )
  drop and replace:          z_t^l <- z_t^l + a_t^l;   S_t^l <- S_t^l + LN(S_t^l)
                             (the M summaries are dropped; the selectors go on to block l+1,
                             where they summarise that block's tokens)
  frozen MLP:                [z; S] <- [z; S] + MLP(LN2([z; S]))

so a lane attends over M + 1 (+ prompts) tokens instead of N + 1. The lane's feature is
f_t = normalize(LN_final(z_t^L)) (pre-head L2 normalisation) and its scores are
s_c = sigmoid(w_c^T f_t / tau + b_c / tau) for the classes c of task t; the prediction
concatenates the scores of all lanes (no prompt selection, no task identification). Training
task t uses lane t only, with the binary cross-entropy on the annotated (current) classes:

  L_t = -(1/|C_t|) sum_{c in C_t} [ y_c log s_c + (1 - y_c) log(1 - s_c) ]

The backbone never changes; lanes of past tasks are frozen (``requires_grad`` off, outside the
optimizer), so their scores do not change once their task ends. A new lane starts as a copy of
the previous lane's selectors and prompts (as the official implementation does).

Three details follow the official code where the paper's text reads otherwise (checked in
``blocks.py`` / ``vision_transformer.py``):
- what is summarised: the selectors attend over every token the frozen block receives, its
  class token included (``einsum(selectors, x)`` over the whole normalised sequence), not over
  the patch tokens only, as the paper's text and title put it;
- the drop-and-replace residual: the attention returns [a(z); LN(S)] and the block adds it to
  [z; S], so the selectors leave the block as S + LN(S) (then the MLP), not as S unchanged;
- the lane's class token starts as the ViT's class-token parameter itself, before the position
  embedding is added (``cls_token.clone()``), not as the frozen sequence's first token.

The paper's ablations, each a switch here and an ``extends: multi_lane`` variant in
``config/methods/incremental/``:
- ``normalize_features: false`` (multi_lane_no_norm): no pre-head L2 normalisation
  (official ``--normalize none``);
- ``drop_and_replace: false`` (multi_lane_no_dandr): the selectors summarise the first block's
  tokens once; the lane then carries [z; P] through every block as ordinary tokens
  (self-attention among them, all outputs kept; official ``--disable_dandr``):
      [z; P] <- [z; S] + MSA([LN(z); P^0]) in block 0,   [z; P] <- [z; P] + MSA(LN([z; P])) after;
- ``task_selection: key_query`` (multi_lane_key_query): one key k_t per task (orthogonal init),
  pulled towards the frozen ViT's final class token q(x) while task t trains,
      L = L_t - 1/B sum_b cos(q(x_b), k_t)
  and at inference each image uses the single lane t*(x) = argmax_t cos(q(x), k_t), whose feature
  goes through every seen class's head row (official ``--head_mode task``, ``TaskIdentifier``).

``shared_prompt`` (shared_prompt.py) is this repository's own baseline, not the paper's.

All lanes (one per class at most, since a task has at least one class) are allocated up front,
so ``state_dict`` has a fixed structure; ``begin_task`` assigns, copies and freezes them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from classlab.methods.registry import register_method
from classlab.methods.learner import IncrementalLearner


def _orthogonal(*shape: int) -> nn.Parameter:
    """Rows of the (shape[0] * ... * shape[-2], shape[-1]) view orthonormal where possible."""
    w = torch.empty(*shape)
    nn.init.orthogonal_(w.view(-1, shape[-1]))
    return nn.Parameter(w)


@register_method("incremental", "multi_lane")
class MultiLane(IncrementalLearner):
    """Task-specific lanes of summary tokens and prefix prompts on a frozen ViT; BCE per task."""

    shared_lane = False  # the shared-prompt baseline (shared_prompt.py) keeps one lane for all tasks

    def __init__(self, model, hparams, num_classes):
        super().__init__(model, hparams, num_classes)
        vit = model.backbone
        blocks = getattr(vit, "blocks", None)
        if blocks is None or getattr(vit, "cls_token", None) is None or getattr(vit, "reg_token", None) is not None:
            raise ValueError(f"{self.name} needs a timm VisionTransformer with a class token (backbone: vit_tiny)")
        if any(getattr(b.attn, "gate", None) is not None for b in blocks):
            raise ValueError(f"{self.name}: gated attention is not supported")
        for p in model.parameters():  # the backbone (and the Classifier's own head) stay frozen
            p.requires_grad_(False)
        dim, depth = int(vit.embed_dim), len(blocks)
        self.dim, self.num_heads = dim, int(blocks[0].attn.num_heads)
        self.num_selectors = int(hparams.get("num_selectors", 10))
        self.num_prompts = int(hparams.get("num_prompts", 10))
        self.prompt_layers = min(int(hparams.get("num_prompt_layers", 5)), depth)
        self.normalize = bool(hparams.get("normalize_features", True))
        self.drop_and_replace = bool(hparams.get("drop_and_replace", True))
        self.task_selection = str(hparams.get("task_selection", "none"))
        self.temperature = float(hparams.get("temperature", 1.0))
        if self.num_selectors < 1:
            raise ValueError(f"{self.name}: num_selectors must be at least 1")
        if self.task_selection not in ("none", "key_query"):
            raise ValueError(f"{self.name}: task_selection must be 'none' or 'key_query', got {self.task_selection!r}")
        lanes = 1 if self.shared_lane else num_classes
        self.selectors = nn.ParameterList([_orthogonal(self.num_selectors, dim) for _ in range(lanes)])
        # prefix key/value prompts per lane: (L_p, 2, P, D), split into heads when used
        self.prompts = nn.ParameterList([_orthogonal(self.prompt_layers, 2, self.num_prompts, dim)
                                         for _ in range(lanes)]) if self.prompt_layers and self.num_prompts else None
        self.heads = nn.ModuleList([nn.Linear(dim, num_classes) for _ in range(lanes)])
        # task keys of the key-query ablation: one per lane, orthogonal as in the official TaskIdentifier
        if self.task_selection == "key_query":
            init = _orthogonal(lanes, dim).detach()
            self.keys = nn.ParameterList([nn.Parameter(init[i].clone()) for i in range(lanes)])
        else:
            self.keys = None
        self.register_buffer("class_lane", torch.full((num_classes,), -1, dtype=torch.long))
        self.lane = 0
        self._freeze_all_but(0)

    # --- structure ----------------------------------------------------------------------
    def _lane_params(self, lane: int) -> list[nn.Parameter]:
        params = [self.selectors[lane], *self.heads[lane].parameters()]
        if self.prompts is not None:
            params.append(self.prompts[lane])
        if self.keys is not None:
            params.append(self.keys[lane])
        return params

    def _freeze_all_but(self, lane: int) -> None:
        for i in range(len(self.heads)):
            for p in self._lane_params(i):
                p.requires_grad_(i == lane)

    def begin_task(self, task_id, new_classes, seen_classes):
        super().begin_task(task_id, new_classes, seen_classes)
        lane = 0 if self.shared_lane else task_id
        if lane >= len(self.heads):
            raise ValueError(f"{self.name}: task {task_id} needs lane {lane} but only {len(self.heads)} exist")
        if lane > 0:
            with torch.no_grad():  # a new lane starts from the previous lane's selectors and prompts
                self.selectors[lane].copy_(self.selectors[lane - 1])
                if self.prompts is not None:
                    self.prompts[lane].copy_(self.prompts[lane - 1])
        self.class_lane[torch.tensor(new_classes, dtype=torch.long)] = lane
        self.lane = lane
        self._freeze_all_but(lane)

    def param_groups(self):
        return [{"params": self._lane_params(self.lane)}]

    # --- forward --------------------------------------------------------------------------
    def _frozen_tokens(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The frozen ViT's tokens entering each block, then its output after the last block (no
        gradient reaches the backbone)."""
        vit = self.model.backbone
        with torch.no_grad():
            h = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
            tokens = []
            for blk in vit.blocks:
                tokens.append(h)
                h = blk(h)
            tokens.append(h)
        return tokens

    def summarize(self, selectors: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """P = softmax(S X^T / sqrt(D)) X: (T, B, M, D) selectors over (B, N, D) tokens."""
        attn = torch.einsum("tbmd,bnd->tbmn", selectors, tokens) * self.dim ** -0.5
        return torch.einsum("tbmn,bnd->tbmd", attn.softmax(dim=-1), tokens)

    def _attend(self, blk, seq: torch.Tensor, lanes: list[int], layer: int, queries: int) -> torch.Tensor:
        """The frozen block's attention for the lane sequence ``seq`` (T, B, S, D), already
        normalised, with the lanes' prefix prompts in the first blocks; the outputs of the first
        ``queries`` tokens, projected: (T, B, queries, D)."""
        attn = blk.attn
        T, B, S, D = seq.shape
        H = self.num_heads
        hd = D // H
        qkv = attn.qkv(seq).reshape(T, B, S, 3, H, hd).permute(3, 0, 1, 4, 2, 5)
        q, k, v = attn.q_norm(qkv[0][..., :queries, :]), attn.k_norm(qkv[1]), qkv[2]
        if self.prompts is not None and layer < self.prompt_layers:
            # K = [p^K; W_K seq], V = [p^V; W_V seq]: prefix prompts of each lane
            p = torch.stack([self.prompts[i][layer] for i in lanes])                # (T, 2, P, D)
            p = p.reshape(T, 2, self.num_prompts, H, hd).permute(1, 0, 3, 2, 4)[:, :, None]
            k = torch.cat([p[0].expand(T, B, H, self.num_prompts, hd), k], dim=-2)
            v = torch.cat([p[1].expand(T, B, H, self.num_prompts, hd), v], dim=-2)
        out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
        return attn.proj(attn.norm(out.transpose(2, 3).reshape(T, B, queries, D)))

    def lane_features(self, x: torch.Tensor, lanes: list[int], tokens: list[torch.Tensor] | None = None
                      ) -> torch.Tensor:
        """f_t for each lane in ``lanes``: (T, B, D)."""
        vit = self.model.backbone
        tokens = self._frozen_tokens(x) if tokens is None else tokens
        T, B, D = len(lanes), x.shape[0], self.dim
        # the lane's class token starts as the ViT's class-token parameter (no position embedding)
        z = vit.cls_token.reshape(1, 1, 1, D).expand(T, B, 1, D)
        s = torch.stack([self.selectors[i] for i in lanes])[:, None].expand(T, B, self.num_selectors, D)
        for l, blk in enumerate(vit.blocks):
            frozen = blk.norm1(tokens[l])                                        # LN(X^l), class token included
            if self.drop_and_replace:
                summary = self.summarize(blk.norm1(s), frozen)                   # P_t^l
                seq = torch.cat([blk.norm1(z), summary], dim=2)                  # (T, B, 1+M, D)
                a = self._attend(blk, seq, lanes, l, queries=1)                  # only the lane token's query
                # drop and replace: z + a(z); the summaries are dropped and the selectors come back
                # as S + LN(S) (the official block adds the normalised selectors it returns)
                zs = torch.cat([z + blk.drop_path1(blk.ls1(a)), s + blk.drop_path1(blk.ls1(blk.norm1(s)))], dim=2)
            else:
                if l == 0:   # summarise once; the summaries then travel as the lane's tokens
                    seq = torch.cat([blk.norm1(z), self.summarize(blk.norm1(s), frozen)], dim=2)
                else:
                    seq = blk.norm1(torch.cat([z, s], dim=2))
                a = self._attend(blk, seq, lanes, l, queries=seq.shape[2])
                zs = torch.cat([z, s], dim=2) + blk.drop_path1(blk.ls1(a))
            zs = zs + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(zs))))
            z, s = zs[:, :, :1], zs[:, :, 1:]
        f = vit.norm(z[:, :, 0])
        return F.normalize(f, dim=-1) if self.normalize else f

    def query(self, tokens: list[torch.Tensor]) -> torch.Tensor:
        """q(x): the frozen ViT's final class token (after its last norm), the key-query ablation's query."""
        return self.model.backbone.norm(tokens[-1])[:, 0]

    def lane_logits(self, x: torch.Tensor, lanes: list[int], tokens: list[torch.Tensor] | None = None
                    ) -> torch.Tensor:
        """(T, B, C): each lane's head over all classes (only its own classes are used)."""
        feats = self.lane_features(x, lanes, tokens)
        return torch.stack([self.heads[i](feats[j]) for j, i in enumerate(lanes)]) / self.temperature

    def select_lanes(self, q: torch.Tensor, lanes: list[int]) -> torch.Tensor:
        """Key-query task selection: t*(x) = argmax_t cos(q(x), k_t) over ``lanes``, as positions in ``lanes``."""
        keys = F.normalize(torch.stack([self.keys[i] for i in lanes]), dim=-1)
        return (F.normalize(q, dim=-1) @ keys.T).argmax(dim=1)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenation of all lanes: the logit of class c comes from the lane of c's task (or,
        with key-query selection, from the one lane its key picks, through c's head row)."""
        lanes = sorted(int(i) for i in self.class_lane.unique().tolist() if i >= 0)
        out = torch.full((x.shape[0], self.num_classes), float("-inf"), device=x.device)
        if not lanes:
            return out
        tokens = self._frozen_tokens(x)
        if self.keys is None:
            logits = self.lane_logits(x, lanes, tokens)
            for j, i in enumerate(lanes):
                cols = self.class_lane == i
                out[:, cols] = logits[j][:, cols]
            return out
        feats = self.lane_features(x, lanes, tokens)                             # (T, B, D)
        picked = self.select_lanes(self.query(tokens), lanes)                    # (B,)
        f = feats[picked, torch.arange(x.shape[0], device=x.device)]             # the chosen lane's feature
        for i in lanes:
            cols = self.class_lane == i
            out[:, cols] = (self.heads[i](f) / self.temperature)[:, cols]
        return out

    def training_step(self, batch):
        x = batch["x"]
        tokens = self._frozen_tokens(x)
        logits = self.lane_logits(x, [self.lane], tokens)[0]
        cols = self.new_mask
        # L_t = BCE(w_c^T f_t + b_c, y_c) averaged over the current task's classes c in C_t
        loss = F.binary_cross_entropy_with_logits(logits[:, cols], batch["y"][:, cols].float())
        logs = {}
        if self.keys is not None:
            # key-query ablation: L = L_t - 1/B sum_b cos(q(x_b), k_t)
            sim = F.cosine_similarity(self.query(tokens), self.keys[self.lane][None, :], dim=1).mean()
            loss = loss - sim
            logs["key_similarity"] = sim.detach()
        return loss, logs

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.features(x)
