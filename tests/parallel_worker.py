"""One rank of a tests/test_parallel.py run (not a test itself): load the checkpoint (whole, then sharded; or
sharded while loading), run the inputs, save what this rank got. Usage: python parallel_worker.py SPEC_JSON."""

import ctypes
import datetime
import json
import os
import signal
import sys

import torch
import torch.distributed as dist

from mixtral import MixtralForCausalLM
from mixtral.parallel.comm import RankFailure
from mixtral.parallel.expert import ExpertParallelMoe
from mixtral.parallel import parallelize


def rss() -> tuple[int, int]:
    """(resident, peak resident) bytes of this process."""
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(status["VmRSS"].split()[0]) * 1024, int(status["VmHWM"].split()[0]) * 1024


def reset_peak() -> None:
    ctypes.CDLL(None).malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS
        f.write("5")


def main() -> None:
    spec = json.loads(sys.argv[1])
    torch.set_num_threads(1)
    backend, device = spec.get("backend", "gloo"), "cpu"
    if backend == "nccl":  # a GPU a rank
        device = f"cuda:{spec['rank']}"
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"file://{spec['init']}", rank=spec["rank"],
                            world_size=spec["world"], timeout=datetime.timedelta(seconds=spec.get("timeout", 60)))
    tp, ep, out = spec["tp"], spec["ep"], {}
    if spec["sharded"]:  # from_pretrained(tp=, ep=): only this rank's slices are read
        if spec.get("control"):  # first (its one-off imports and allocations counted here): the same share, from
            reset_peak()  # the whole model loaded, then sharded
            before = rss()[0]
            whole = parallelize(MixtralForCausalLM.from_pretrained(spec["folder"], progress=False), tp, ep)
            out["control_peak"] = rss()[1] - before
            control = [t.clone() for t in whole.state_dict().values()]
            del whole
        reset_peak()
        before = rss()[0]
        model = MixtralForCausalLM.from_pretrained(spec["folder"], progress=False, tp=tp, ep=ep, device=device,
                                                   quantization=spec.get("quantize"))
        out["load_peak"] = rss()[1] - before
        if spec.get("control"):
            out["equal"] = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), control))
    else:
        model = parallelize(MixtralForCausalLM.from_pretrained(spec["folder"], progress=False).eval(), tp, ep)
    out["weight_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    out["parameters"] = sum(p.numel() for p in model.parameters())
    if spec["inputs"]:
        inputs = {k: v.to(device) for k, v in torch.load(spec["inputs"], weights_only=True).items()}
        with torch.no_grad():
            out["logits"] = model(inputs["ids"], attention_mask=inputs["mask"]).logits.cpu()
        out["tokens"] = model.generate(inputs["ids"], attention_mask=inputs["mask"], max_new_tokens=10,
                                       pad_token_id=0, eos_token_id=None).cpu()
    if spec.get("fail"):  # one rank dies or hangs in its 5th layer call; the others must say which
        fail, calls = spec["fail"], []

        def trip(*_):
            calls.append(1)
            if spec["rank"] == fail["rank"] and len(calls) == 5:
                os._exit(3) if fail["how"] == "die" else os.kill(os.getpid(), signal.SIGSTOP)

        model.model.layers[0].register_forward_hook(trip)
        try:
            model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=20, pad_token_id=0, eos_token_id=None)
        except RankFailure as e:
            torch.save({"error": str(e), "ranks": e.ranks}, spec["out"])
            sys.exit(17)
    out["idle"] = sum(m.idle_steps for m in model.modules() if isinstance(m, ExpertParallelMoe))
    torch.save(out, spec["out"])
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
