"""The `palmcore` command line.

    palmcore            the main job on its embedded default: `train` with no arguments
    palmcore demo       forward + backward of the `seed` preset on the Python standard library's text
    palmcore train      train a PaLM on text files (default: the `seed` preset on the stdlib)
    palmcore generate   continue a prompt with a trained checkpoint, printing as it goes
    palmcore export     a checkpoint as a Hugging Face model directory (transformers' CohereForCausalLM) or GGUF
    palmcore import     a Hugging Face CohereForCausalLM directory as a palmcore run (generate, fine-tune)
    palmcore plan       memory, FLOPs and communication per device of a sharded training step
    palmcore info       what was compiled in and which GPUs are here; presets, parameter counts, FLOPs per token
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import time

import numpy as np

import palmcore
from palmcore import checks
from palmcore.config import PaLMConfig
from palmcore.data import stdlib_files
from palmcore.generation import sampling_settings
from palmcore.plan import MeshShape
from palmcore.training import DEFAULTS as TRAINING_DEFAULTS
from palmcore.training import run
from palmcore.training import settings as training_settings


def stdlib_text(max_bytes: int) -> bytes:
    """The first ``max_bytes`` of the standard library's sources."""
    chunks, size = [], 0
    for path in stdlib_files():
        with open(path, "rb") as f:
            data = f.read()
        chunks.append(data)
        size += len(data)
        if size >= max_bytes:
            break
    return b"".join(chunks)[:max_bytes]


def _argument(parse, check):
    """An argparse type: ``parse`` the text, then ``check`` it with palmcore.checks (its
    message becomes argparse's)."""
    def convert(text: str):
        try:
            return check(parse(text))
        except (TypeError, ValueError) as e:
            raise argparse.ArgumentTypeError(str(e).replace("value must", "must")) from None
    return convert


positive_int = _argument(int, lambda v: checks.integer("value", v, 1))
nonnegative_int = _argument(int, lambda v: checks.integer("value", v, 0))
seed_int = _argument(int, lambda v: checks.integer("value", v, 0, 2**64 - 1))
thread_count = _argument(int, lambda v: checks.integer("value", v, 0, 1024))
port_number = _argument(int, lambda v: checks.integer("value", v, 1, 65535))
nonnegative_real = _argument(float, lambda v: checks.real("value", v, low=0.0))
positive_real = _argument(float, lambda v: checks.real("value", v, low=0.0, low_open=True))
fraction = _argument(float, lambda v: checks.real("value", v, 0.0, 1.0, low_open=True))


class _Parser(argparse.ArgumentParser):
    """Every parser of the command line: long flags are never abbreviated (`--step` is not
    `--steps`), and --help shows each flag's default (a training setting's is written into its help)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{"allow_abbrev": False, **kwargs})

    def add_argument(self, *args, **kwargs):
        default, text = kwargs.get("default"), kwargs.get("help") or ""
        shown = not (default in (None, [], argparse.SUPPRESS) or default is False or "default" in text)
        if shown and args[0].startswith("-"):
            kwargs["help"] = f"{text} (default: %(default)s)".lstrip()
        return super().add_argument(*args, **kwargs)


def _setting_flag(parser: argparse.ArgumentParser):
    """add_argument for a training setting: absent from the parsed arguments unless given (so
    that palmcore.training.settings applies its defaults, or a resume the run's own), with the
    default named in its help."""
    def add(flag: str, help: str, **kwargs) -> None:
        name = flag[2:].replace("-", "_")
        if "default" not in help and name in TRAINING_DEFAULTS:
            help += f" (default: {TRAINING_DEFAULTS[name]})"
        parser.add_argument(flag, default=argparse.SUPPRESS, help=help, **kwargs)
    return add


def demo(args: argparse.Namespace) -> None:
    cfg = PaLMConfig.preset(args.preset)
    B, T = args.batch_size, args.seq_len
    if args.threads:
        palmcore.set_num_threads(args.threads)
    print(f"palmcore {palmcore.__version__}: preset '{args.preset}', {cfg.num_params() / 1e6:.2f}M "
          f"parameters, batch {B} x {T}, {palmcore.get_num_threads()} threads")
    # Bytes as token ids (every byte < 256 < V) until the tokenizer lands.
    text = np.frombuffer(stdlib_text(B * (T + 1) * args.steps), dtype=np.uint8).astype(np.int64)
    windows = text[: (len(text) // (T + 1)) * (T + 1)].reshape(-1, T + 1)
    model = palmcore.PaLM(cfg, seed=args.seed)
    flops = cfg.flops_per_token(T)
    for step in range(args.steps):
        rows = windows[np.arange(step * B, (step + 1) * B) % len(windows)]
        model.zero_grad()
        start = time.perf_counter()
        out = model.forward_backward(rows[:, :-1], rows[:, 1:])
        elapsed = time.perf_counter() - start
        grad_norm = np.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in model.grads().values()))
        tokens_per_s = B * T / elapsed
        print(f"step {step}: loss {out['loss']:.4f}  ce {out['ce']:.4f}  ppl {np.exp(out['ce']):.1f}  "
              f"|grad| {grad_norm:.3f}  {tokens_per_s:,.0f} tokens/s  "
              f"{flops * tokens_per_s / 1e9:.1f} GFLOP/s")
    print(f"(an untrained model: expect ce near ln V = {np.log(cfg.vocab_size):.2f}; "
          "training and generation come with `palmcore train` and `palmcore generate`)")


def config_overrides(pairs: list[str]) -> dict:
    """``key=value`` pairs for PaLMConfig; values parsed as JSON where they can be."""
    fields = {f.name for f in dataclasses.fields(PaLMConfig)}
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in fields:
            raise SystemExit(f"--set takes key=value with key one of {', '.join(sorted(fields))}; got {pair!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


def train(args: argparse.Namespace) -> None:
    if args.threads:
        palmcore.set_num_threads(args.threads)
    given = {k: v for k, v in vars(args).items() if k not in ("command", "threads", "out", "resume", "force")}
    corpus, overrides = given.pop("corpus", None), config_overrides(given.pop("set", []))
    settings = training_settings(corpus, out=args.out, overrides=overrides, resume=args.resume, **given)
    summary = run(settings, resume=args.resume, force=args.force)
    if summary:  # the main rank
        print_summary(summary, settings.out, resume_command(settings))
    if summary.get("stopped_by") == "interrupt":
        raise KeyboardInterrupt  # saved; the exit status says it was cut short


def resume_command(settings) -> str:
    """The command that continues a run (its settings come from its checkpoint; where and how
    it runs are repeated)."""
    mesh = MeshShape.parse(settings.mesh)
    return ((f"mpiexec -n {mesh.size} " if mesh.size > 1 else "")
            + f"palmcore train --resume --out {shlex.quote(settings.out)}"
            + (f" --device {settings.device}" if settings.device != "cpu" else "")
            + (f" --mesh {settings.mesh}" if mesh.size > 1 else ""))


def _minutes(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes}m {seconds}s"


def print_summary(summary: dict, out: str, resume: str) -> None:
    """The end of a training run, for a person: the sample, what was trained, where it is, and
    the command to try next (or the one that continues a run stopped early)."""
    if "sample" in summary:
        settings = ", ".join(f"{k.replace('_', '-')} {v}" for k, v in summary["sample_settings"].items())
        print(f"\nsample ({settings}), continuing a held-out prompt:")
        if sys.stdout.isatty():
            print(f"\033[2m{summary['sample_prompt']}\033[0m\033[1m{summary['sample']}\033[0m")
        else:
            print(f"{summary['sample_prompt']}\n----- the model's continuation -----\n{summary['sample']}")
    print(f"\ntrained to step {summary['steps']:,} ({summary['tokens']:,} tokens) in {_minutes(summary['wall_s'])}"
          + (f" (the whole run; {_minutes(summary['session_s'])} since resuming at step {summary['resumed_from']:,})"
             if "resumed_from" in summary else "")
          + ("" if summary["stopped_by"] == "steps" else f", stopped by the {summary['stopped_by']}"))
    if "val_loss" in summary:
        print(f"validation at step {summary['val_step']:,}: loss {summary['val_loss']:.4f}, "
              f"perplexity {summary['val_ppl']:.2f}, {summary['val_bpb']:.3f} bits/byte")
    print(f"checkpoint: {summary['checkpoint']}")
    if summary["plot"]:
        print(f"loss plot:  {summary['plot']}")
    if summary["stopped_by"] != "steps":
        print(f"resume:     {resume}")
    print(f"try:        palmcore generate --checkpoint {shlex.quote(out)} --prompt 'def fibonacci('")


def generate(args: argparse.Namespace) -> None:
    from palmcore.text import load_cached, stream_text  # noqa: PLC0415

    if args.threads:
        palmcore.set_num_threads(args.threads)
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    repetition_penalty=args.repetition_penalty, seed=args.seed)
    sampling_settings(args.max_new_tokens, stop_tokens=(), **sampling)  # checked before anything is read
    model, tokenizer = load_cached(args.checkpoint, args.device, args.precision, args.weights)

    def continue_prompt(text: str) -> None:
        pieces = stream_text(model, tokenizer, text, args.max_new_tokens, **sampling)  # checks first
        print(text, end="", flush=True)
        for piece in pieces:
            print(piece, end="", flush=True)
        print(flush=True)

    if not args.interactive:
        continue_prompt(args.prompt)
        return
    print(f"palmcore generate: {args.checkpoint} ({model.num_params() / 1e6:.1f}M parameters). "
          "One prompt per line; an empty line or Ctrl-D ends.", file=sys.stderr)
    sys.stdin.reconfigure(errors="surrogateescape")  # bytes that are not UTF-8 are named, not fatal
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line:
            break
        try:
            continue_prompt(line)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)


def serve(args: argparse.Namespace) -> None:
    from palmcore import serve as server  # noqa: PLC0415

    if server.FastAPI is None:
        raise RuntimeError("palmcore serve needs FastAPI and uvicorn: pip install 'palmcore[serve]'")
    if args.threads:
        palmcore.set_num_threads(args.threads)
    server.serve(args.checkpoint, args.host, args.port, args.slots, args.queue, args.device, args.precision,
                 args.chat_template, args.api_key, args.max_request_bytes, args.shutdown_timeout, args.weights)


WEIGHT_FORMATS = ["fp32", "bf16", "int8"]
WEIGHTS_HELP = ("compact decode weights on the CPU (weight-only; activations float32): bf16 halves the bytes a "
                "decode step reads, int8 (a float32 scale per 32 weights, like Q8_0) nearly quarters them")

_SIZE_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _size(text: str) -> int:
    """Bytes, or a number with K, M, G or T (powers of 1024), e.g. 2G."""
    value = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = value[-1:] if value[-1:] in _SIZE_UNITS else ""
    try:
        size = round(float(value[:len(value) - len(unit)]) * _SIZE_UNITS[unit])
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 2G or 500M") from None
    if size < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive size")
    return size


_EXPORT_DTYPES = {"hf": ("float32", "bf16"), "gguf": ("f32", "float32", "f16", "bf16", "q8_0")}


def export(args: argparse.Namespace) -> None:
    dtype = args.dtype or _EXPORT_DTYPES[args.format][0]
    if dtype not in _EXPORT_DTYPES[args.format]:
        raise ValueError(f"--dtype {dtype} is not a --format {args.format} dtype: choose one of "
                         f"{', '.join(_EXPORT_DTYPES[args.format])}")
    if args.format == "gguf":
        export_gguf(args, dtype)
        return
    from palmcore.interchange import DEFAULT_MAX_SHARD_BYTES, export_checkpoint  # noqa: PLC0415

    out = export_checkpoint(args.checkpoint, args.out, dtype=dtype,
                            max_shard_bytes=args.max_shard_size or DEFAULT_MAX_SHARD_BYTES, overwrite=args.force)
    files = sorted(os.listdir(out))
    print(f"exported {args.checkpoint} as a Hugging Face CohereForCausalLM ({dtype}) to {out}:")
    print("  " + ", ".join(files))
    if "tokenizer.json" not in files:
        print("  (the checkpoint holds no tokenizer.model: weights only, no tokenizer)")
    print("load it with transformers (no custom code):\n"
          f"  AutoModelForCausalLM.from_pretrained({out!r}); AutoTokenizer.from_pretrained({out!r})")


def export_gguf(args: argparse.Namespace, dtype: str) -> None:
    from palmcore.gguf_export import export_checkpoint_gguf  # noqa: PLC0415

    if args.max_shard_size is not None:
        raise ValueError("--max-shard-size is for --format hf: a GGUF export is one file")
    out = export_checkpoint_gguf(args.checkpoint, args.out, dtype=dtype, overwrite=args.force)
    print(f"exported {args.checkpoint} as a GGUF file (llama.cpp's command-r architecture, {dtype}) to {out} "
          f"({os.path.getsize(out) / 2**20:.1f} MiB)")
    print("run it with llama.cpp (it adds </s> before the prompt, as palmcore does):\n"
          f"  llama-completion -m {shlex.quote(out)} -no-cnv -p 'def fibonacci(' -n 40   (-no-cnv: text, not chat)\n"
          f"  llama-server -m {shlex.quote(out)}")


def import_run(args: argparse.Namespace) -> None:
    from palmcore.interchange import finetune_command, import_hf  # noqa: PLC0415

    model, tokenizer = import_hf(args.source, out=args.out, tokenizer=args.tokenizer, optimizer=args.optimizer)
    cfg = model.config
    print(f"imported {args.source} ({model.num_params() / 1e6:.1f}M parameters: d_model {cfg.d_model}, "
          f"n_layers {cfg.n_layers}, n_heads {cfg.n_heads}, n_kv_heads {cfg.n_kv_heads}) into {args.out}")
    if tokenizer is None:
        print("  no SentencePiece tokenizer.model came with it (--tokenizer gives one): `palmcore generate` "
              "needs one; the weights are usable from Python (palmcore.checkpoint.load)")
    else:
        print(f"generate:  palmcore generate --checkpoint {shlex.quote(args.out)} --prompt 'def fibonacci('")
    print(f"fine-tune: {finetune_command(cfg, args.out)}" + (f" --optimizer {args.optimizer}"
                                                             if args.optimizer != "adafactor" else ""))


def plan(args: argparse.Namespace) -> None:
    from palmcore.plan import MeshShape, plan as make_plan  # noqa: PLC0415

    cfg = PaLMConfig.preset(args.preset, **config_overrides(args.set))
    print(make_plan(cfg, MeshShape.parse(args.mesh), args.batch, args.seq, args.peak_tflops * 1e12, args.mfu).table())


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def _nccl_line() -> str:
    """NCCL is opened at run time: its version and file here, or why it cannot be opened."""
    from palmcore import _core  # noqa: PLC0415
    try:
        version, path = _core.nccl_library_info()
    except RuntimeError as e:
        return f"yes, loaded at run time; {e}"
    return f"yes, loaded at run time: NCCL {version // 10000}.{version // 100 % 100}.{version % 100} from {path}"


def build_report() -> list[str]:
    """What this palmcore was compiled with, then what this machine has (GPUs or why none)."""
    from palmcore import _core  # noqa: PLC0415

    b = _core.build_info()
    lines = ["compiled with:",
             f"  compiler  {b['compiler']}",
             f"  CPU       {' '.join(b['cpu_features']) or 'baseline (no SIMD extensions beyond the default)'}",
             f"  BLAS      {b['blas']}" + (f" ({b['blas_config']})" if b["blas_config"] else ""),
             f"  MPI       {'yes (MPICH ABI, loaded at run time)' if b['mpi'] else 'no'}"]
    if b["cuda_emulated"]:
        lines.append(f"  CUDA      EMULATED on the CPU (PALMCORE_CUDA={b['cuda_option']}: csrc/cuda_emulator, a "
                     "correctness tool for the CUDA code, not a backend), reference cuBLASLt")
    elif b["cuda"]:
        v = b["cuda_runtime_version"]
        archs = ", ".join(f"sm_{a}" for a in b["cuda_architectures"])
        lines.append(f"  CUDA      yes: CUDA {v // 1000}.{v % 1000 // 10} (nvcc {b['cuda_version']}), {archs}, "
                     f"cuBLASLt loaded at run time (PALMCORE_CUDA={b['cuda_option']})")
    else:
        lines.append(f"  CUDA      no (PALMCORE_CUDA={b['cuda_option']})")
    lines.append(f"  NCCL      {_nccl_line() if b['nccl'] else 'no (needs the CUDA backend)'}")
    lines.append("found here:")
    devices = _core.cuda_devices()
    for d in devices:
        lines.append(f"  GPU {d['index']}     {d['name']}, compute capability {d['compute_capability']}, "
                     f"{d['multiprocessors']} SMs, {_gib(d['total_memory'])} ({_gib(d['free_memory'])} free)")
    reason = _core.cuda_unavailable_reason()
    if reason:
        lines.append(f"  CUDA      not usable: {reason}")
    elif devices:
        driver = _core.cuda_driver_version()
        lines.append(f"  CUDA      usable (driver supports CUDA {driver // 1000}.{driver % 1000 // 10})")
    return lines


def info(args: argparse.Namespace) -> None:
    print(f"palmcore {palmcore.__version__}, {palmcore.get_num_threads()} threads")
    print("\n".join(build_report()))
    print(f"{'preset':<10} {'params':>15} {'active params':>15} {'GFLOP/token (T=2048)':>22}")
    for name in PaLMConfig.presets():  # active: what one token uses (k of a sparse layer's experts)
        cfg = PaLMConfig.preset(name)
        print(f"{name:<10} {cfg.num_params():>15,} {cfg.num_active_params():>15,} "
              f"{cfg.flops_per_token(2048) / 1e9:>22.3f}")


def build_parser() -> argparse.ArgumentParser:
    """The command line: its subcommands (``parser.subcommands``: name -> parser) and flags."""
    parser = _Parser(prog="palmcore", description="A PaLM runtime with a C++ core. `palmcore` alone runs the "
                     "default job: `palmcore train` with no arguments (the seed preset on the Python standard "
                     "library's sources for about 10 minutes, into runs/default).")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    p_demo = sub.add_parser("demo", help="forward + backward of a preset on the stdlib's text")
    p_demo.add_argument("--preset", default="seed", choices=["seed"])
    p_demo.add_argument("--batch-size", type=positive_int, default=8)
    p_demo.add_argument("--seq-len", type=positive_int, default=256)
    p_demo.add_argument("--steps", type=positive_int, default=5)
    p_demo.add_argument("--threads", type=thread_count, default=0, help="0: PALMCORE_NUM_THREADS or all cores")
    p_demo.add_argument("--seed", type=seed_int, default=0)
    p_train = sub.add_parser("train", help="train on text files (default: the stdlib's sources)",
                             description="Train a PaLM on text files. With --resume the run's settings come from "
                                         "its checkpoint: a flag given again must agree with it (--steps, "
                                         "--time-budget, --corpus, evaluation and execution flags may change).")
    setting = _setting_flag(p_train)
    setting("--corpus", nargs="+", help="files, folders or globs (default: the Python standard library's sources)")
    setting("--tokenizer", help="a SentencePiece .model to reuse (default: train one into --out)")
    setting("--vocab-size", type=positive_int, help="of a tokenizer trained here (at most: a small corpus gets fewer)")
    setting("--preset", choices=PaLMConfig.presets(), help="the model's shape")
    setting("--set", action="append", metavar="KEY=VALUE", help="config override, e.g. --set n_layers=4 (repeatable)")
    setting("--batch-size", type=positive_int, help="sequences per step")
    setting("--seq-len", type=positive_int, help="tokens per sequence (a corpus too small for it gets what fits)")
    setting("--accumulate", type=positive_int, help="micro-batches per step (must divide --batch-size)")
    setting("--steps", type=positive_int, help="optimizer steps")
    setting("--time-budget", type=nonnegative_real, help="seconds (default: none, or 540 for the default run)")
    setting("--optimizer", choices=["adafactor", "adamw"], help="the optimizer")
    setting("--lr", type=nonnegative_real, help="peak learning rate (default: 1e-2 for adafactor, 3e-4 for adamw)")
    setting("--schedule", choices=["palm", "cosine"], help="the learning-rate schedule")
    setting("--eval-every", type=positive_int, help="steps between evaluations and checkpoints (default: 100, or "
                                                    "what gives the default run a curve)")
    setting("--seed", type=seed_int, help="of the initial weights and the data order")
    setting("--precision", choices=["fp32", "bf16"],
            help="bf16: mixed precision as PALM_SPEC says (float32 master weights and checkpoints)")
    p_train.add_argument("--out", default="runs/default", help="the run folder")
    p_train.add_argument("--resume", action="store_true", help="continue the run in --out")
    p_train.add_argument("--force", action="store_true",
                         help="replace the run in --out (it is kept until the new one has its first checkpoint)")
    p_train.add_argument("--threads", type=thread_count, default=0, help="0: PALMCORE_NUM_THREADS or all cores")
    p_train.add_argument("--device", default="cpu",
                         help="cpu, cuda or cuda:N (see palmcore info); under mpiexec, cuda is each rank's own "
                              "GPU (cuda:<its rank on the node>) and the mesh's collectives use NCCL")
    p_train.add_argument("--mesh", default="data=1,model=1",
                         help="data=D,model=M: data- and tensor-parallel over D·M ranks "
                              "(mpiexec -n D·M palmcore train --mesh ...)")
    p_gen = sub.add_parser("generate", help="continue a prompt with a trained checkpoint")
    p_gen.add_argument("--checkpoint", default="runs/default",
                       help="a run folder, its checkpoints folder or one checkpoint (default: runs/default)")
    p_gen.add_argument("--prompt", default="", help="text to continue (default: a new document)")
    p_gen.add_argument("--interactive", action="store_true", help="keep reading prompts from stdin")
    p_gen.add_argument("--max-new-tokens", type=positive_int, default=200)
    p_gen.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p_gen.add_argument("--top-k", type=nonnegative_int, default=40, help="0: off")
    p_gen.add_argument("--top-p", type=float, default=0.95, help="1: off")
    p_gen.add_argument("--repetition-penalty", type=float, default=1.0, help="1: off")
    p_gen.add_argument("--seed", type=seed_int, default=0)
    p_gen.add_argument("--threads", type=thread_count, default=0)
    p_gen.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (see palmcore info)")
    p_gen.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                       help="bf16: PALM_SPEC mixed precision (bfloat16 activations and cache on a GPU)")
    p_gen.add_argument("--weights", choices=WEIGHT_FORMATS, default="fp32", help=WEIGHTS_HELP)
    p_srv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (continuous batching)")
    p_srv.add_argument("--checkpoint", default="runs/default",
                       help="a run folder, its checkpoints folder or one checkpoint (default: runs/default)")
    p_srv.add_argument("--host", default="127.0.0.1")
    p_srv.add_argument("--port", type=port_number, default=8000)
    p_srv.add_argument("--slots", type=positive_int, default=16, help="sequences decoded together")
    p_srv.add_argument("--queue", type=nonnegative_int, default=64, help="sequences waiting; beyond: 429")
    p_srv.add_argument("--threads", type=thread_count, default=0)
    p_srv.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (see palmcore info)")
    p_srv.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p_srv.add_argument("--weights", choices=WEIGHT_FORMATS, default="fp32", help=WEIGHTS_HELP)
    p_srv.add_argument("--chat-template", metavar="FILE",
                       help="a Jinja chat template for /v1/chat/completions (default: the run's, else a plain one)")
    p_srv.add_argument("--api-key", metavar="KEY",
                       help="require 'Authorization: Bearer KEY' (default: $PALMCORE_API_KEY, if set)")
    p_srv.add_argument("--max-request-bytes", type=_size, default="1M",
                       help="a larger request body gets 413 (bytes, or with K, M, G)")
    p_srv.add_argument("--shutdown-timeout", type=nonnegative_real, default=30.0,
                       help="seconds SIGTERM waits for requests in flight before cutting them off")
    p_exp = sub.add_parser("export", help="a checkpoint as a Hugging Face model directory (CohereForCausalLM) "
                                          "or a GGUF file (llama.cpp)")
    p_exp.add_argument("--checkpoint", default="runs/default",
                       help="a run folder, its checkpoints folder or one checkpoint (default: runs/default)")
    p_exp.add_argument("--format", choices=["hf", "gguf"], default="hf",
                       help="hf: transformers' CohereForCausalLM layout, safetensors; gguf: one file for llama.cpp "
                            "(its command-r architecture)")
    p_exp.add_argument("--out", required=True, help="hf: the directory to write (must not exist, or be empty); "
                                                    "gguf: the file to write (must not exist)")
    p_exp.add_argument("--dtype", choices=sorted({d for ds in _EXPORT_DTYPES.values() for d in ds}),
                       help="weights' dtype; hf: float32 (default, exact) or bf16 (rounded to nearest even); gguf: "
                            "f32 (default, exact), f16, bf16 or q8_0")
    p_exp.add_argument("--max-shard-size", type=_size,
                       help="hf: split the weights into shards with an index above this size (default 4G)")
    p_exp.add_argument("--force", action="store_true", help="replace a non-empty --out (gguf: an existing file)")
    p_imp = sub.add_parser("import", help="a Hugging Face CohereForCausalLM directory as a palmcore run")
    p_imp.add_argument("--from", dest="source", required=True, help="the Hugging Face model directory")
    p_imp.add_argument("--out", required=True, help="the run folder to create (must not exist, or be empty)")
    p_imp.add_argument("--tokenizer", help="a palmcore SentencePiece .model (default: the directory's tokenizer.model)")
    p_imp.add_argument("--optimizer", choices=["adafactor", "adamw"], default="adafactor",
                       help="the optimizer whose fresh state the run starts with (for --resume)")
    p_plan = sub.add_parser("plan", help="memory, FLOPs and communication per device on a mesh")
    p_plan.add_argument("--preset", default="palm-540b", choices=PaLMConfig.presets())
    p_plan.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p_plan.add_argument("--mesh", default="data=1,model=1", help="data=D,model=M")
    p_plan.add_argument("--batch", type=positive_int, default=2048, help="sequences per step, whole mesh")
    p_plan.add_argument("--seq", type=positive_int, default=2048)
    p_plan.add_argument("--peak-tflops", type=positive_real, default=275.0, help="per device (TPU v4 bf16: 275)")
    p_plan.add_argument("--mfu", type=fraction, default=0.462, help="model FLOPs utilization (PaLM 540B: 0.462)")
    sub.add_parser("info", help="what was compiled in, GPUs found; presets, parameter counts, FLOPs per token")
    parser.subcommands = sub.choices
    return parser


def parse_arguments(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """The arguments of ``argv`` (none: the default job's, `palmcore train`); a flag that is not
    the subcommand's is an error with that subcommand's usage (SystemExit 2)."""
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        (parser.subcommands[args.command] if args.command else parser).error(
            f"unrecognized arguments: {' '.join(unknown)}")
    return args if args.command else parser.parse_args(["train"])


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_arguments(parser, argv)
    commands = {"demo": demo, "train": train, "generate": generate, "serve": serve, "export": export,
                "import": import_run, "plan": plan, "info": info}
    try:
        commands[args.command](args)
    except (ValueError, TypeError, RuntimeError) as e:  # a clear message, not a traceback
        parser.exit(2, f"palmcore {args.command}: error: {e}\n")
    except MemoryError:
        parser.exit(2, f"palmcore {args.command}: error: out of memory (a batch, sequence or model too large "
                       "for this machine)\n")
    except OSError as e:  # a path that cannot be made or read
        parser.exit(2, f"palmcore {args.command}: error: {e.strerror or e}"
                       f"{': ' + str(e.filename) if e.filename else ''}\n")
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
