"""`mapping: released` under 2 gloo ranks: after every step both ranks hold the same (written-back) values."""

from __future__ import annotations

import json
import subprocess

from tests.hisf.engine.helpers import WORKTREE, child_env, torchrun

RANK_SCRIPT = """
import json, sys
import torch
import torch.distributed as dist
from hisf.config import BackboneConfig, MethodConfig, TrainConfig
from hisf.engine import resolve_precision, train_step
from hisf.engine.checkpoint import TrialState
from hisf.engine.optim import member_optimizer
from hisf.engine.distributed import broadcast_params, init_from_env, shutdown
from hisf.model.backbone import load_backbone
from hisf.model.methods import build_method

torch.set_num_threads(1)
env = init_from_env("cpu")
torch.manual_seed(0)
backbone = load_backbone(BackboneConfig(name="hisf-tiny", pretrained=None))  # the same frozen weights on both ranks
torch.manual_seed(10 + env.rank)  # different prompt-side starting values on purpose: the broadcast aligns them
cfg = MethodConfig(name="hicropl", depth=3, cross_layer=1, n_ctx=4, mapping="released")
model = build_method(cfg, backbone, ["cat", "dog", "sea lion"]).train()
params = [p for p in model.parameters() if p.requires_grad]
opt, sched, pairs = member_optimizer(model, 0, TrainConfig(preset="hicropl", lr=0.01, weight_decay=0.0, warmup_epochs=0))
state = TrialState(model, opt, sched, None, member=0, pairs=pairs)  # the one member's Adam over its views
broadcast_params(params, env)

def spread():
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    gathered = [torch.empty_like(flat) for _ in range(env.world_size)]
    dist.all_gather(gathered, flat)
    return (gathered[0] - gathered[1]).abs().max().item()

def visual():
    return model.prompts.cross_prompts_visual[0].detach().clone()

out = {"steps": [], "moved": []}
g = torch.Generator().manual_seed(100 + env.rank)  # each rank its own batch
for step in range(3):
    before = visual()
    images, labels = torch.randn(2, 3, 32, 32, generator=g), torch.randint(0, 3, (2,), generator=g)
    train_step(model, images, labels, [state], resolve_precision("fp32", env.device), env)
    out["steps"].append(spread())
    out["moved"].append((visual() - before).abs().max().item())
model.eval()
with torch.no_grad():
    for _ in range(3 - env.rank):  # rank 0 evaluates 3 batches, rank 1 two (an uneven evaluation split)
        model(torch.randn(2, 3, 32, 32, generator=g))
out["after_eval"] = spread()
broadcast_params(params, env)  # what the engine does after validation for forward-writing models
out["after_broadcast"] = spread()
json.dump(out, open(sys.argv[1] + f".{env.rank}", "w"))
dist.barrier()  # teardown together (a gloo pair torn down on one side can abort the other)
shutdown(env)
"""


def test_released_write_back_keeps_ranks_identical_after_every_step(tmp_path):
    out = tmp_path / "ranks.json"
    cmd = torchrun(2, tmp_path / "rank.py", out)
    (tmp_path / "rank.py").write_text(RANK_SCRIPT)
    proc = subprocess.run(cmd, env=child_env(), cwd=WORKTREE, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = json.loads((tmp_path / "ranks.json.0").read_text())
    assert r0 == json.loads((tmp_path / "ranks.json.1").read_text())  # gathered values: both ranks saw the same
    assert r0["steps"] == [0.0, 0.0, 0.0]  # bitwise identical after each step, write-back included
    assert min(r0["moved"]) > 1e-4  # and the write-back (plus the update) really changed the prompts each step
    assert r0["after_eval"] > 1e-4  # uneven evaluation forwards leave the ranks apart ...
    assert r0["after_broadcast"] == 0.0  # ... until rank 0's values are broadcast
