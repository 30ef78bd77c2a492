"""One rank of a tests/test_parallel.py run (not a test itself): load the checkpoint, shard it, run the inputs,
save what rank `rank` got. Usage: python parallel_worker.py SPEC_JSON."""

import datetime
import json
import sys

import torch
import torch.distributed as dist

from mixtral import MixtralForCausalLM
from mixtral.parallel import expert_parallel, tensor_parallel
from mixtral.parallel.expert import ExpertParallelMoe


def main() -> None:
    spec = json.loads(sys.argv[1])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{spec['init']}", rank=spec["rank"],
                            world_size=spec["world"], timeout=datetime.timedelta(seconds=60))
    model = MixtralForCausalLM.from_pretrained(spec["folder"], progress=False).eval()
    {"tp": tensor_parallel, "ep": expert_parallel}[spec["mode"]](model)
    inputs = torch.load(spec["inputs"], weights_only=True)
    with torch.no_grad():
        logits = model(inputs["ids"], attention_mask=inputs["mask"]).logits
    tokens = model.generate(inputs["ids"], attention_mask=inputs["mask"], max_new_tokens=10, pad_token_id=0,
                            eos_token_id=None)
    weights = sum(p.numel() for p in model.parameters())
    idle = sum(m.idle_steps for m in model.modules() if isinstance(m, ExpertParallelMoe))
    torch.save({"logits": logits, "tokens": tokens, "parameters": weights, "idle": idle}, spec["out"])
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
