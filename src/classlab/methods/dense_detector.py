"""The small query-based detector that the dense family's detection methods share (not a method).

It is DETR (Carion et al., "End-to-End Object Detection with Transformers", ECCV 2020) with the
parts of DINO (Zhang et al., "DINO: DETR with Improved DeNoising Anchor Boxes for End-to-End Object
Detection", ICLR 2023) that make a small model converge quickly, at the scale of our 84x84 scenes:

    backbone map (B, D, h, w) -> 1x1 projection to d, + 2D sine positions -> encoder layers
    -> two-stage query selection (DINO): every encoder token scores the classes and proposes a
       box around its own position; the Q tokens of highest class score give the decoder its Q
       reference boxes, the content queries are learned (DINO's "mixed" query selection)
    -> decoder layers (self-attention, cross-attention to the encoder tokens, FFN), each refining
       its reference boxes (box_l = sigmoid(delta_l + logit(box_{l-1}))) and scoring the classes.

Multi-scale deformable attention is replaced by plain attention over the one 21x21 map, modulated by
a Gaussian around each query's reference box (SMCA, Gao et al., ICCV 2021; ``spatial_prior``): like
deformable attention's sampling around the reference, it makes a query read its own box, which is
what speeds up DETR-type detectors' convergence (one rough check on fashion_mnist_lt_scenes val:
AP 0.10 after 9 epochs of a 12-epoch run without it, 0.16 after a 9-epoch run with it). Left out:
contrastive denoising queries and look-forward-twice.

Boxes are normalised (cx, cy, w, h) in [0, 1] inside the detector; targets come in as canvas
pixels x0, y0, x1, y1 (x1, y1 exclusive) and ``detect`` returns pixels again (x0 = (cx - w/2) W, ...).

Training (DETR / Deformable DETR). For every output set (the encoder's Q proposals, each decoder
layer: the auxiliary losses), the Hungarian matching (``scipy.optimize.linear_sum_assignment``)
minimises, between prediction i and ground-truth object j of class c_j,

    cost(i, j) = w_cls [alpha (1 - p_ic)^gamma (-log p_ic) - (1 - alpha) p_ic^gamma (-log(1 - p_ic))]_{c = c_j}
               + w_L1 |b_i - b_j|_1 - w_giou GIoU(b_i, b_j)

and the loss of the set is (N = number of ground-truth objects in the batch, at least 1)

    L = l_cls / N sum_{i, c} FL(p_ic, y_ic) + l_L1 / N sum_matched |b_i - b_j|_1
        + l_giou / N sum_matched (1 - GIoU(b_i, b_j)),

FL the sigmoid focal loss (``torchvision.ops.sigmoid_focal_loss``, alpha = 0.25, gamma = 2),
y_ic = 1 only for the class of the object matched to prediction i. The weights are DINO's: cost
2 / 5 / 2, loss 1 / 5 / 2.

The hook. How a query is scored against the classes is what the methods differ in:

- ``image_context(fmap)`` -> dict computed once per image batch from the backbone map (default: empty);
  a ``"class_mask"`` entry (B, C) bool restricts the classes that count for that image: the others
  get no loss, no matching cost, and score 0 at inference;
- ``class_logits(embeddings (B, N, d), context)`` -> (B, N, C): the class logits of any set of
  embeddings (encoder tokens, decoder queries);
- ``extra_loss(context, targets)`` -> (loss, logs): a method's own term (default 0).

Hyperparameters (``DETECTOR_KEYS``, identical in every detection method's YAML): d_model, heads,
ffn_dim, num_queries, encoder_layers, decoder_layers, proposal_size, focal_alpha, focal_gamma,
cost_class, cost_l1, cost_giou, loss_class, loss_l1, loss_giou, aux_loss, spatial_prior,
detections_per_image.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou, sigmoid_focal_loss

from classlab.config import ConfigError
from classlab.methods.dense_learner import DenseLearner, DenseTargets

DETECTOR_KEYS = ("d_model", "heads", "ffn_dim", "num_queries", "encoder_layers", "decoder_layers", "proposal_size",
                 "focal_alpha", "focal_gamma", "cost_class", "cost_l1", "cost_giou", "loss_class", "loss_l1",
                 "loss_giou", "aux_loss", "spatial_prior", "detections_per_image")
DETECTOR_DEFAULTS = {"d_model": 64, "heads": 4, "ffn_dim": 128, "num_queries": 16, "encoder_layers": 1,
                     "decoder_layers": 2, "proposal_size": 0.25, "focal_alpha": 0.25, "focal_gamma": 2.0,
                     "cost_class": 2.0, "cost_l1": 5.0, "cost_giou": 2.0, "loss_class": 1.0, "loss_l1": 5.0,
                     "loss_giou": 2.0, "aux_loss": True, "spatial_prior": True,
                     "detections_per_image": 100}
PRIOR_PROB = 0.01  # RetinaNet / DINO: class logits start at sigmoid^-1(0.01), so focal loss starts small


def prior_bias() -> float:
    return -math.log((1 - PRIOR_PROB) / PRIOR_PROB)


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def sine_embedding(coords: torch.Tensor, num_feats: int, temperature: float = 10000.0) -> torch.Tensor:
    """DETR's sine embedding of coordinates in [0, 1]: (..., n) -> (..., n * num_feats); for each
    coordinate u and frequency f_i = temperature^(2 floor(i/2) / num_feats), sin(2 pi u / f_i) on even
    i and cos on odd i."""
    i = torch.arange(num_feats, dtype=torch.float32, device=coords.device)
    freq = temperature ** (2 * torch.div(i, 2, rounding_mode="floor") / num_feats)
    angles = coords.float()[..., None] * (2 * math.pi) / freq  # (..., n, num_feats)
    emb = torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=-1).flatten(-2)
    return emb.flatten(-2)


class MLP(nn.Module):
    def __init__(self, dim_in: int, dim_hidden: int, dim_out: int, layers: int):
        super().__init__()
        dims = [dim_in] + [dim_hidden] * (layers - 1) + [dim_out]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for k, layer in enumerate(self.layers):
            x = layer(x)
            if k < len(self.layers) - 1:
                x = F.relu(x)
        return x


class EncoderLayer(nn.Module):
    """DETR's post-norm encoder layer: positions added to queries and keys, not to values."""

    def __init__(self, d: int, heads: int, ffn_dim: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(d, ffn_dim), nn.ReLU(), nn.Linear(ffn_dim, d))
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, src: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        q = src + pos
        src = self.norm1(src + self.attn(q, q, src, need_weights=False)[0])
        return self.norm2(src + self.ffn(src))


class DecoderLayer(nn.Module):
    """DETR's post-norm decoder layer; ``query_pos`` comes from the query's reference box (DAB/DINO) and
    ``attn_bias`` (B * heads, Q, hw) is added to the cross-attention logits (``spatial_prior``)."""

    def __init__(self, d: int, heads: int, ffn_dim: int):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(d, ffn_dim), nn.ReLU(), nn.Linear(ffn_dim, d))
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, tgt, query_pos, memory, memory_pos, attn_bias=None):
        q = tgt + query_pos
        tgt = self.norm1(tgt + self.self_attn(q, q, tgt, need_weights=False)[0])
        tgt = self.norm2(tgt + self.cross_attn(tgt + query_pos, memory + memory_pos, memory, attn_mask=attn_bias,
                                               need_weights=False)[0])
        return self.norm3(tgt + self.ffn(tgt))


def spatial_prior(ref: torch.Tensor, centres: torch.Tensor, heads: int, min_size: float) -> torch.Tensor:
    """SMCA's Gaussian-like spatial modulation of cross-attention (Gao et al., "Fast Convergence of DETR
    with Spatially Modulated Co-Attention", ICCV 2021), with fixed per-head widths: head m adds

        -((x - cx)^2 / (2 (s_m w / 2)^2) + (y - cy)^2 / (2 (s_m h / 2)^2)),   s_m = 2^(m - 1),

    to the logits of the token at (x, y) for the query whose reference box is (cx, cy, w, h): the
    first head reads around the box's centre, later ones ever wider (the last nearly the whole image).
    It stands in for deformable attention's sampling around the reference (DINO): both make a query
    read its own box. ``ref`` (B, Q, 4) cxcywh, ``centres`` (hw, 2) -> (B * heads, Q, hw)."""
    scales = 2.0 ** (torch.arange(heads, device=ref.device, dtype=torch.float32) - 1)  # (heads,)
    half = ref[..., 2:].float().clamp(min=min_size) / 2  # (B, Q, 2)
    delta = centres[None, None].float() - ref[..., None, :2].float()  # (B, Q, hw, 2)
    sigma = half[:, None, :, None, :] * scales[None, :, None, None, None]  # (B, heads, Q, 1, 2)
    bias = -0.5 * ((delta[:, None] / sigma) ** 2).sum(-1)  # (B, heads, Q, hw)
    return bias.flatten(0, 1)


def hungarian_match(cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The assignment of predictions (rows) to objects (columns) of least total cost
    (``scipy.optimize.linear_sum_assignment``): (row indices, column indices), one pair per object
    when there are at least as many predictions as objects."""
    from scipy.optimize import linear_sum_assignment

    if cost.dim() != 2:
        raise ValueError(f"cost: expected a (predictions, objects) matrix, got shape {tuple(cost.shape)}")
    if cost.shape[1] == 0:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty.clone()
    rows, cols = linear_sum_assignment(cost.detach().float().cpu().numpy())
    return torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)


def focal_class_cost(logits: torch.Tensor, labels: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """Deformable DETR's classification cost (N, G) of giving each of N predictions the class of each
    of G objects: the focal loss of the positive minus that of the negative at that class."""
    p = logits[:, labels].float().sigmoid()
    positive = alpha * (1 - p) ** gamma * -(p + 1e-8).log()
    negative = (1 - alpha) * p ** gamma * -(1 - p + 1e-8).log()
    return positive - negative


class QueryDetector(DenseLearner):
    """The shared detector; subclasses set how queries are classified (module docstring)."""

    task = "detection"

    def __init__(self, model: nn.Module, hparams: dict, num_classes: int,
                 image_shape: tuple[int, int, int] = (3, 84, 84)):
        super().__init__(model, {**DETECTOR_DEFAULTS, **dict(hparams)}, num_classes, image_shape)
        hp = self.hparams
        self._check_hparams(hp)
        d, heads, ffn = int(hp["d_model"]), int(hp["heads"]), int(hp["ffn_dim"])
        channels, h, w = self.feature_shape
        self.d_model = d
        self.num_queries = min(int(hp["num_queries"]), h * w)  # the encoder proposes at most one box per token
        self.input_proj = nn.Sequential(nn.Conv2d(channels, d, 1), nn.GroupNorm(min(8, d), d))
        self.encoder = nn.ModuleList(EncoderLayer(d, heads, ffn) for _ in range(int(hp["encoder_layers"])))
        self.decoder = nn.ModuleList(DecoderLayer(d, heads, ffn) for _ in range(int(hp["decoder_layers"])))
        # two-stage proposals (DINO's gen_encoder_output_proposals): tokens -> Linear + LayerNorm
        self.enc_output = nn.Sequential(nn.Linear(d, d), nn.LayerNorm(d))
        self.enc_box_head = MLP(d, d, 4, 3)
        self.box_heads = nn.ModuleList(MLP(d, d, 4, 3) for _ in range(len(self.decoder)))
        for head in [self.enc_box_head, *self.box_heads]:
            # Deformable DETR: a box head starts as the identity on its reference box
            nn.init.zeros_(head.layers[-1].weight)
            nn.init.zeros_(head.layers[-1].bias)
        self.query_content = nn.Embedding(self.num_queries, d)  # DINO: learned content, selected positions
        self.ref_point_head = MLP(2 * d, d, d, 2)  # sine(cx, cy, w, h) -> query position (DAB-DETR / DINO)
        self.build_class_head(d)

    # --- configuration ----------------------------------------------------------------------
    @staticmethod
    def _check_hparams(hp: dict) -> None:
        for key in ("d_model", "heads", "ffn_dim", "num_queries", "decoder_layers", "detections_per_image"):
            if int(hp[key]) < 1:
                raise ConfigError(f"{key}: {hp[key]} (at least 1)")
        if int(hp["encoder_layers"]) < 0:
            raise ConfigError(f"encoder_layers: {hp['encoder_layers']} (0 or more)")
        if int(hp["d_model"]) % int(hp["heads"]) or int(hp["d_model"]) % 4:
            raise ConfigError(f"d_model: {hp['d_model']} must be a multiple of 4 and of heads ({hp['heads']})")
        if not 0 < float(hp["proposal_size"]) < 1:
            raise ConfigError(f"proposal_size: {hp['proposal_size']} (a fraction of the image in (0, 1))")
        if not 0 <= float(hp["focal_alpha"]) <= 1:
            raise ConfigError(f"focal_alpha: {hp['focal_alpha']} (in [0, 1])")

    # --- the hook (class_head overrides build_class_head and class_logits) -----------------------
    def build_class_head(self, d: int) -> None:
        raise NotImplementedError

    def image_context(self, fmap: torch.Tensor) -> dict:
        return {}

    def class_logits(self, embeddings: torch.Tensor, context: dict) -> torch.Tensor:
        raise NotImplementedError

    def extra_loss(self, context: dict, targets: DenseTargets) -> tuple[torch.Tensor, dict]:
        return torch.zeros((), device=targets.labels.device), {}

    # --- forward ----------------------------------------------------------------------------
    def _grid(self, h: int, w: int, device) -> torch.Tensor:
        """(h * w, 2): the normalised centre (cx, cy) of every token of the map, row-major."""
        ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
        xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
        cy, cx = torch.meshgrid(ys, xs, indexing="ij")
        return torch.stack((cx.reshape(-1), cy.reshape(-1)), dim=-1)

    def forward_detector(self, x: torch.Tensor) -> dict:
        """``{"layers": [{"logits" (B, Q, C), "boxes" (B, Q, 4) cxcywh}, ...] (one per decoder layer),
        "encoder": the same for the Q selected proposals, "context": image_context's dict}``."""
        fmap = self.features(x)
        context = self.image_context(fmap)
        src = self.input_proj(fmap)
        b, d, h, w = src.shape
        centres = self._grid(h, w, src.device)
        pos = sine_embedding(centres, d // 2).to(src.dtype)[None]  # (1, hw, d)
        memory = src.flatten(2).transpose(1, 2)
        for layer in self.encoder:
            memory = layer(memory, pos)

        # DINO two-stage selection: each token proposes a box around its centre and scores the classes
        tokens = self.enc_output(memory)
        enc_logits = self.class_logits(tokens, context)
        anchor = torch.cat((centres, torch.full_like(centres, float(self.hparams["proposal_size"]))), dim=-1)
        enc_unact = self.enc_box_head(tokens) + inverse_sigmoid(anchor)[None]
        score = enc_logits.detach().float()
        mask = context.get("class_mask")
        if mask is not None:
            score = score.masked_fill(~mask[:, None, :], float("-inf"))
        top = score.max(dim=-1).values.topk(self.num_queries, dim=1).indices  # (B, Q)
        enc_sel_logits = enc_logits.gather(1, top[..., None].expand(-1, -1, enc_logits.shape[-1]))
        enc_sel_unact = enc_unact.gather(1, top[..., None].expand(-1, -1, 4))

        ref_unact = enc_sel_unact.detach()  # the decoder's reference boxes take no gradient (DINO)
        tgt = self.query_content.weight[None].expand(b, -1, -1)
        layers = []
        heads, min_size = int(self.hparams["heads"]), 1.0 / max(h, w)
        for layer, box_head in zip(self.decoder, self.box_heads):
            ref = ref_unact.sigmoid()
            query_pos = self.ref_point_head(sine_embedding(ref, d // 2).to(tgt.dtype))
            bias = spatial_prior(ref, centres, heads, min_size) if self.hparams["spatial_prior"] else None
            tgt = layer(tgt, query_pos, memory, pos, bias)
            box_unact = box_head(tgt) + ref_unact  # box_l = sigmoid(delta_l + logit(box_{l-1}))
            layers.append({"logits": self.class_logits(tgt, context), "boxes": box_unact.sigmoid()})
            ref_unact = box_unact.detach()
        return {"layers": layers, "encoder": {"logits": enc_sel_logits, "boxes": enc_sel_unact.sigmoid()},
                "context": context}

    # --- loss -------------------------------------------------------------------------------
    def normalised_targets(self, targets: DenseTargets) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per image: (boxes (k, 4) normalised cx, cy, w, h; labels (k,)), padding dropped."""
        _, height, width = self.image_shape
        scale = targets.boxes.new_tensor([width, height, width, height])
        out = []
        for i in range(len(targets.labels)):
            boxes, labels = targets.objects(i)
            out.append((box_convert(boxes.float() / scale, "xyxy", "cxcywh"), labels.long()))
        return out

    def match(self, logits, boxes, objects, mask=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per image, (prediction indices, object indices) of the Hungarian matching under the cost of
        the module docstring. A class outside the image's ``mask`` costs nothing (it has no score)."""
        hp = self.hparams
        indices = []
        with torch.no_grad():
            for i, (tboxes, tlabels) in enumerate(objects):
                if len(tlabels) == 0:
                    indices.append(hungarian_match(logits.new_zeros(logits.shape[1], 0)))
                    continue
                cost_class = focal_class_cost(logits[i], tlabels, float(hp["focal_alpha"]), float(hp["focal_gamma"]))
                if mask is not None:
                    cost_class = cost_class * mask[i, tlabels].float()[None]
                pred = boxes[i].float()
                cost_l1 = torch.cdist(pred, tboxes, p=1)
                cost_giou = -generalized_box_iou(box_convert(pred, "cxcywh", "xyxy"),
                                                 box_convert(tboxes, "cxcywh", "xyxy"))
                cost = (float(hp["cost_class"]) * cost_class + float(hp["cost_l1"]) * cost_l1
                        + float(hp["cost_giou"]) * cost_giou)
                rows, cols = hungarian_match(cost)
                indices.append((rows.to(logits.device), cols.to(logits.device)))
        return indices

    def set_loss(self, output: dict, objects, mask, num_boxes: float) -> dict:
        """The three terms of one output set (module docstring), each divided by ``num_boxes``."""
        hp = self.hparams
        logits, boxes = output["logits"].float(), output["boxes"].float()
        indices = self.match(logits, boxes, objects, mask)
        onehot = torch.zeros_like(logits)
        src_boxes, tgt_boxes = [], []
        for i, ((rows, cols), (tboxes, tlabels)) in enumerate(zip(indices, objects)):
            onehot[i, rows, tlabels[cols]] = 1.0
            src_boxes.append(boxes[i, rows])
            tgt_boxes.append(tboxes[cols])
        if mask is not None:
            # classes outside the image's mask are no negatives (and an object of such a class is no positive)
            logits = torch.where(mask[:, None, :], logits, torch.zeros_like(logits))
        focal = sigmoid_focal_loss(logits, onehot, alpha=float(hp["focal_alpha"]), gamma=float(hp["focal_gamma"]),
                                   reduction="none")
        if mask is not None:
            focal = focal * mask[:, None, :].float()
        src, tgt = torch.cat(src_boxes), torch.cat(tgt_boxes)
        l1 = (src - tgt).abs().sum()
        giou = (1 - torch.diag(generalized_box_iou(box_convert(src, "cxcywh", "xyxy"),
                                                   box_convert(tgt, "cxcywh", "xyxy")))).sum()
        return {"class": focal.sum() / num_boxes, "l1": l1 / num_boxes, "giou": giou / num_boxes}

    def detection_loss(self, out: dict, targets: DenseTargets) -> tuple[torch.Tensor, dict]:
        hp = self.hparams
        objects = self.normalised_targets(targets)
        num_boxes = max(float(sum(len(lab) for _, lab in objects)), 1.0)
        mask = out["context"].get("class_mask")
        sets = out["layers"] if hp["aux_loss"] else out["layers"][-1:]
        if hp["aux_loss"]:
            sets = [out["encoder"], *sets]  # DINO: the encoder's selected proposals are supervised too
        total = torch.zeros((), device=targets.labels.device)
        last = {}
        for output in sets:
            last = self.set_loss(output, objects, mask, num_boxes)
            total = total + (float(hp["loss_class"]) * last["class"] + float(hp["loss_l1"]) * last["l1"]
                             + float(hp["loss_giou"]) * last["giou"])
        logs = {f"loss_{k}": float(v.detach()) for k, v in last.items()}  # the last decoder layer's terms
        return total, logs

    def training_step(self, batch: dict) -> tuple[torch.Tensor, dict]:
        targets = self.batch_targets(batch)
        out = self.forward_detector(batch["x"])
        loss, logs = self.detection_loss(out, targets)
        extra, extra_logs = self.extra_loss(out["context"], targets)
        logs.update(extra_logs)
        return loss + extra, logs

    # --- prediction -------------------------------------------------------------------------
    @torch.no_grad()
    def detect(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Per image, the ``detections_per_image`` (query, class) pairs of highest score
        sigmoid(logit) of the last decoder layer (DETR's top-k post-processing over queries x classes;
        a class outside the image's ``class_mask`` has score 0 and is not returned):
        ``{"boxes": (n, 4) x0, y0, x1, y1 in pixels, clipped to the image, "scores": (n,),
        "labels": (n,) int64}``. ``x`` is normalised like the training batches; call ``eval()`` first."""
        out = self.forward_detector(x)
        last = out["layers"][-1]
        scores = last["logits"].float().sigmoid()
        mask = out["context"].get("class_mask")
        if mask is not None:
            scores = scores * mask[:, None, :].float()
        b, q, c = scores.shape
        height, width = x.shape[-2:]
        boxes = box_convert(last["boxes"].float(), "cxcywh", "xyxy") * scores.new_tensor([width, height, width, height])
        boxes[..., 0::2] = boxes[..., 0::2].clamp(0, width)
        boxes[..., 1::2] = boxes[..., 1::2].clamp(0, height)
        k = min(int(self.hparams["detections_per_image"]), q * c)
        top_scores, top = scores.reshape(b, -1).topk(k, dim=1)
        results = []
        for i in range(b):
            keep = top_scores[i] > 0
            flat = top[i][keep]
            results.append({"boxes": boxes[i, flat // c], "scores": top_scores[i][keep], "labels": flat % c})
        return results
