"""What each method is, as data: default prompt sizes, the presets it accepts, the settings a run line shows.

Declared once, beside the builders (`hisf/model/methods.py` maps the same names to them), and importable
without torch: `hisf/config.py` (defaults, validation) and the orchestrator's dry-run and status lines read
it before anything heavy loads.
"""

from __future__ import annotations

from dataclasses import dataclass

from hisf.presets import PRESETS

# The parameter groups every method's `param_groups()` returns; the optimiser presets group by them.
PARAM_GROUPS = ("prompts", "projections", "fusion", "label_embeddings")


@dataclass(frozen=True)
class MethodFacts:
    name: str
    n_ctx: int  # prompt tokens per layer when `method.n_ctx` is unset
    # Prompt depth D when `method.depth` is unset, applied when the config is built so params, tags and resume
    # identities record it (zeroshot and coop record 9 too, though they prompt layer 0 at most).
    depth: int
    settings: tuple[str, ...]  # the method keys a dry-run / status line shows (docs/interfaces.md)
    trains: bool = True  # False: nothing to train (the line leaves out preset and batch)
    presets: tuple[str, ...] = tuple(PRESETS)  # `train.preset` values the method accepts
    # The `method.*` keys its builder and loss read (besides `name`); the others do not change its numbers, so
    # a tracker need not log them (tests/hisf/model/test_method_facts.py checks each against the builder).
    reads: tuple[str, ...] = ()


_PROMPTS = ("n_ctx", "depth", "layers", "ctx_init")


METHODS: dict[str, MethodFacts] = {m.name: m for m in (
    MethodFacts("zeroshot", n_ctx=0, depth=9, settings=(), trains=False),
    MethodFacts("coop", n_ctx=16, depth=9, settings=("n_ctx",), reads=("n_ctx", "ctx_init")),
    MethodFacts("maple", n_ctx=2, depth=9, settings=("n_ctx", "depth"), reads=_PROMPTS),
    MethodFacts("hisf", n_ctx=2, depth=9, settings=("n_ctx", "depth"),
                reads=_PROMPTS + ("pi", "sf", "label_embedding", "share_fusion", "fusion_heads", "fusion_bottleneck",
                                  "sf_zero_init", "lambda_le", "lambda_sa", "cls_loss", "le_detach")),
    MethodFacts("hicropl", n_ctx=16, depth=12, settings=("n_ctx", "depth", "cross_layer", "lambda_distill", "mapping",
                                                         "released_storage", "descriptions"),
                reads=_PROMPTS + ("cross_layer", "lkp_heads", "mapper_heads", "lambda_distill", "descriptions",
                                  "mapping", "released_storage")),
)}
