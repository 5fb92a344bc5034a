"""The `pdserve` command line."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from engine.errors import PDServeError


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default="smollm2-135m", help="checkpoint dir, .gguf file, smollm2-135m or dummy:<preset>"
    )
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--kv-cache-memory", type=int, default=None, help="bytes of KV cache (default: device's)")
    p.add_argument("--max-model-len", type=int, default=None)


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")


def _sampling_params(args: argparse.Namespace):
    from engine import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=tuple(args.stop),
        ignore_eos=args.ignore_eos,
    )


def _stream(engine, prompt, params) -> str:
    """Run one request to the end, printing text as it is finalised; returns the full text."""
    rid = engine.add_request(prompt, params)
    printed = ""
    start = time.monotonic()
    out = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == rid:
                sys.stdout.write(out.text[len(printed) :])
                sys.stdout.flush()
                printed = out.text
    elapsed = time.monotonic() - start
    n = out.num_output_tokens if out else 0
    print(
        f"\n[{n} tokens, {n / elapsed:.1f} tok/s, finish={out.finish_reason if out else None}]",
        file=sys.stderr,
    )
    return printed


def cmd_generate(args: argparse.Namespace) -> int:
    from engine import LLM, EngineConfig, LLMEngine
    from engine.errors import TokenizerUnavailableError

    engine = LLMEngine(
        EngineConfig(
            model=args.model,
            dtype=args.dtype,
            device=args.device,
            kv_cache_memory=args.kv_cache_memory,
            max_model_len=args.max_model_len,
        )
    )
    params = _sampling_params(args)
    if engine.tokenizer is None:
        raise TokenizerUnavailableError(
            f"model {args.model!r} has no tokenizer, so pdserve generate cannot take text; "
            "use a checkpoint with tokenizer.json or a GGUF file with tokenizer metadata"
        )
    llm = LLM.from_engine(engine)

    def prompt_of(history):
        return llm.chat_prompt_ids(history) if args.chat else history[-1]["content"]

    if not args.interactive:
        if args.prompt is None:
            print("pdserve generate: give --prompt TEXT or --interactive", file=sys.stderr)
            return 2
        _stream(engine, prompt_of([{"role": "user", "content": args.prompt}]), params)
        return 0
    history: list[dict[str, str]] = []
    print("pdserve: type a message, an empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            return 0
        if not line:
            return 0
        history.append({"role": "user", "content": line})
        try:
            answer = _stream(engine, prompt_of(history), params)
        except PDServeError as exc:  # e.g. the conversation outgrew the context: say so, keep going
            print(f"error: {exc}", file=sys.stderr)
            history.pop()
            continue
        history.append({"role": "assistant", "content": answer})


def cmd_check_config(args: argparse.Namespace) -> int:
    """Print the config with every default filled in, or the first problem with its key."""
    import yaml

    from cluster.config import load_config

    config = load_config(args.config)
    print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
    gpus = f"{config.num_gpus} GPUs" if config.model.device != "cpu" else "CPU only"
    print(f"# {args.config}: valid ({gpus})", file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    from cluster.config import load_config
    from cluster.serve import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)  # one line per request is too much
    from placement.plan import resolve

    config = resolve(load_config(args.config), progress=lambda step: print(f"planning: {step}", flush=True))
    if config.placement.mode == "auto" or config.placement.plan:
        pools = " and ".join(f"{pool.instances} {role}" for role, pool in config.pools.items())
        print(f"placement: {pools} instances", flush=True)
    asyncio.run(serve(config, grpc_port=args.grpc_port, http_port=args.http_port))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """Search the placement for the config's SLOs, print the ranked table, write the plan file."""
    from cluster.config import load_config
    from placement import plan as planning

    config = load_config(args.config)
    start = time.monotonic()
    result = planning.plan(config, progress=lambda step: print(f"searching: {step}", file=sys.stderr))
    elapsed = time.monotonic() - start
    print(planning.table(result))
    print(
        f"\n{result.num_simulations} simulations in {elapsed:.1f} s; "
        f"{len(result.rejected)} configurations ruled out",
        file=sys.stderr,
    )
    for reason in result.rejected[: args.show_rejected]:
        print(f"  ruled out: {reason}", file=sys.stderr)
    planning.save_plan(args.out, config, result)
    print(f"plan written to {args.out} (serve it with placement.plan: {args.out})", file=sys.stderr)
    if args.plot:
        planning.plot(args.plot, f"{config.model.name} on {config.placement.gpu}", result)
        print(f"plot written to {args.plot}", file=sys.stderr)
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    """Measure the engine's step times on this machine and fit the latency model."""
    from cluster.config import load_config
    from placement.profiler import DEFAULT_REPEATS, profile_engine

    config = load_config(args.config)
    repeats = DEFAULT_REPEATS if args.repeats is None else args.repeats
    profile = profile_engine(config, hardware=args.hardware or config.placement.gpu, repeats=repeats)
    profile.save(args.out)
    print(f"prefill: {profile.prefill}\ndecode:  {profile.decode}\nfit error: {profile.fit_error}")
    print(f"profile written to {args.out} (use it with placement.profile: {args.out})", file=sys.stderr)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Drive a running cluster at one or more rates (or search its goodput) and report attainment."""
    import dataclasses

    from cluster.bench import LoadSpec, Traffic
    from cluster.bench_report import BenchReport
    from cluster.bench_session import BenchSession
    from cluster.config import load_config
    from placement import plan as planning
    from placement.profiler import Profile
    from placement.simulator import SLO

    config = load_config(args.config)
    if args.profile is not None:
        config = dataclasses.replace(
            config, placement=dataclasses.replace(config.placement, profile=args.profile)
        )
    served = planning.resolve(config) if args.predict else config
    model = planning.model_config(config)
    traffic = Traffic(
        args.workload or config.placement.trace or config.placement.workload,
        num_requests=args.num_requests,
        duration=args.duration,
        length_scale=args.length_scale or config.placement.length_scale,
        seed=args.seed,
        max_total_len=min(config.model.max_model_len or model.max_model_len, model.max_model_len),
    )
    slo = SLO(config.slo.ttft_ms / 1e3, config.slo.tpot_ms / 1e3, config.slo.attainment)
    target = args.target or f"{config.server.host}:{config.server.grpc_port}"
    spec = LoadSpec(target, config.server.auth_token, seed=args.seed, timeout=config.server.request_timeout_s)
    report = BenchReport(str(args.config), target, traffic.describe(), slo)

    profile_path = served.placement.profile
    profile = Profile.load(profile_path) if args.predict and profile_path is not None else None
    predictor = planning.predictor(served) if args.predict else None
    log = lambda line: print(line, file=sys.stderr)  # noqa: E731
    session = BenchSession(traffic, spec, report, predictor, profile, args.calibrate, log)
    if args.goodput:
        session.goodput(args.rate[0] if args.rate else 1.0, args.steps)
    else:
        session.rates(args.rate or [1.0])
    print(report.markdown())
    for path in report.write(args.out, plots=not args.no_plots):
        print(f"written: {path}", file=sys.stderr)
    return 0


def _rates(text: str) -> list[float]:
    try:
        rates = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"rates are numbers in req/s separated by commas, got {text!r}"
        ) from None
    if not rates or any(not r > 0 for r in rates):
        raise argparse.ArgumentTypeError(f"rates must be positive req/s, got {text!r}")
    return rates


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve", description="Disaggregated prefill/decode LLM serving")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text with the engine in this process")
    _add_engine_args(gen)
    _add_sampling_args(gen)
    gen.add_argument("--prompt", help="the prompt (or the user message with --chat)")
    gen.add_argument("--chat", action="store_true", help="apply the model's chat template")
    gen.add_argument("--interactive", "-i", action="store_true", help="chat on the terminal (implies --chat)")
    gen.set_defaults(func=cmd_generate)
    check = sub.add_parser("check-config", help="validate a deployment config file and print it in full")
    check.add_argument("config", help="the YAML file (see configs/)")
    check.set_defaults(func=cmd_check_config)
    srv = sub.add_parser("serve", help="start the cluster from a config file and serve gRPC and HTTP")
    srv.add_argument("--config", required=True, help="the deployment YAML (see configs/)")
    srv.add_argument("--grpc-port", type=int, default=None, help="override server.grpc_port (0: any free)")
    srv.add_argument("--http-port", type=int, default=None, help="override server.http_port (0: any free)")
    srv.set_defaults(func=cmd_serve)
    pln = sub.add_parser("plan", help="choose each phase's parallelism and pool size from the SLOs")
    pln.add_argument("--config", required=True, help="the deployment YAML (its placement section)")
    pln.add_argument("--out", default="plan.yaml", help="the plan file to write (default: plan.yaml)")
    pln.add_argument("--plot", default=None, help="also draw attainment against rate into this image")
    pln.add_argument("--show-rejected", type=int, default=10, help="ruled-out configurations to list")
    pln.set_defaults(func=cmd_plan)
    prof = sub.add_parser("profile", help="measure the engine on this machine for the placement model")
    prof.add_argument("--config", required=True, help="the deployment YAML (model, batching)")
    prof.add_argument("--out", default="profile.json", help="the profile to write (default: profile.json)")
    prof.add_argument("--hardware", default=None, help="the name it is for (default: placement.gpu)")
    prof.add_argument(
        "--repeats",
        type=int,
        help="timings per shape, taken in passes over the grid; the median is kept (default: 5)",
    )
    prof.set_defaults(func=cmd_profile)
    bench = sub.add_parser(
        "bench", help="drive a running cluster with a workload; SLO attainment and goodput"
    )
    bench.add_argument("--config", required=True, help="the deployment YAML (SLOs, server address, workload)")
    bench.add_argument(
        "--target", default=None, help="host:port of its gRPC endpoint (default: the config's)"
    )
    bench.add_argument(
        "--workload", default=None, help="a preset (chatbot, code, summarization) or a trace file"
    )
    bench.add_argument(
        "--rate",
        "--rates",
        type=_rates,
        default=None,
        help="req/s, or several separated by commas (default: 1)",
    )
    bench.add_argument(
        "--goodput", action="store_true", help="bisect over rate for the goodput (from --rate)"
    )
    bench.add_argument("--steps", type=int, default=3, help="bisection steps of --goodput (default: 3)")
    bench.add_argument("--num-requests", type=int, default=200, help="requests per rate (default: 200)")
    bench.add_argument("--duration", type=float, default=None, help="seconds of arrivals per rate at most")
    bench.add_argument(
        "--length-scale",
        type=float,
        default=None,
        help="input and output lengths times this (default: placement.length_scale, 1)",
    )
    bench.add_argument("--seed", type=int, default=0, help="arrivals, lengths and prompt tokens")
    bench.add_argument(
        "--predict", action="store_true", help="also simulate the same requests (placement model)"
    )
    bench.add_argument(
        "--profile", default=None, help="the profile --predict uses (default: placement.profile)"
    )
    bench.add_argument(
        "--calibrate",
        action="store_true",
        help="scale the profile to the serving path from the first (lowest) rate's run, then predict",
    )
    bench.add_argument("--out", default="bench-results", help="folder for results.json, summary.md and plots")
    bench.add_argument("--no-plots", action="store_true", help="skip the PNG plots (no matplotlib needed)")
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "interactive", False):
        args.chat = True
    try:
        return args.func(args)
    except PDServeError as exc:
        print(f"pdserve: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
