"""The ``kvstore`` command: serve | stats | put | get | config | calibrate.

Subcommands import what they need when they run, so ``kvstore stats`` does not
load the server and ``kvstore serve`` does not load torch. This is the only
module that prints.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvstore.errors import InvalidArgument, KVStoreError

DEFAULT_ADDRESS = "127.0.0.1:50051"



def _add_serve(sub: Any) -> None:
    p = sub.add_parser("serve", help="run the daemon (embedded default: 127.0.0.1:50051)")
    p.add_argument("--config", help="TOML config file (else $KVSTORE_CONFIG, else defaults)")
    p.add_argument("--listen", help="HOST:PORT to bind (server.listen)")
    p.add_argument("--data-dir", help="disk tier directory (tiers.disk.path)")
    p.add_argument("--allow-insecure-remote", action="store_true", default=None,
                   help="allow binding a non-loopback address without TLS "
                   "(server.allow_insecure_remote)")
    p.add_argument("--redis", help="shared Redis tier URL (tiers.redis.url)")
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR (log.level)")
    p.add_argument("--log-format", choices=("text", "json"),
                   help="one key=value line or one JSON object per event (log.format)")
    p.set_defaults(run=_run_serve)


def _add_config(sub: Any) -> None:
    p = sub.add_parser("config", help="check a config file or print the config reference")
    actions = p.add_subparsers(dest="action", required=True)
    check = actions.add_parser("check", help="print the effective config and every error "
                               "(key and line); exit 1 if there is any")
    check.add_argument("file", help="TOML config file")
    check.set_defaults(run=_run_config_check)
    ref = actions.add_parser("reference", help="every key with its default and meaning "
                             "(Markdown, as in the README)")
    ref.set_defaults(run=_run_config_reference)


def _add_client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", action="append", help="daemon HOST:PORT (default "
                   f"{DEFAULT_ADDRESS}); repeat the flag to fail over in order")
    p.add_argument("--token", help="bearer token, if the daemon requires one")
    p.add_argument("--tls-ca-file", help="PEM CA bundle: talk TLS")
    p.add_argument("--tls-cert-file", help="PEM client certificate (mutual TLS)")
    p.add_argument("--tls-key-file", help="PEM key of --tls-cert-file")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per call (default 60)")


def _add_stats(sub: Any) -> None:
    p = sub.add_parser("stats", help="print tier occupancy and counters")
    _add_client_args(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--metrics", metavar="HOST:PORT", help="read the daemon's Prometheus "
                   "endpoint (server.metrics_listen) and show every figure: tiers, RPC "
                   "latencies, namespaces, Redis breakers, codec, tenants")
    p.set_defaults(run=_run_stats)


def _add_put_get(sub: Any) -> None:
    put = sub.add_parser("put", help="store KV from a safetensors file (tensors 'tokens', 'kv')")
    get = sub.add_parser("get", help="fetch stored KV into a safetensors file")
    for p in (put, get):
        _add_client_args(p)
        p.add_argument("--namespace", required=True, help="namespace name (model id@revision)")
        p.add_argument("--file", required=True, help="safetensors with 'tokens' int32 [n] and "
                       "(for put, or to infer the layout) 'kv' [layers, 2, heads, n, dim]")
        p.add_argument("--chunk-tokens", type=int, default=256, help="tokens per chunk (256)")
        p.add_argument("--tp-rank", type=int, default=0, help="tensor-parallel rank (0)")
    get.add_argument("--out", required=True, help="safetensors file to write")
    for name in ("num-layers", "num-kv-heads", "head-dim"):
        get.add_argument(f"--{name}", type=int, help="layout, when --file has no 'kv'")
    get.add_argument("--dtype", choices=("float16", "bfloat16", "float32"),
                     help="layout dtype, when --file has no 'kv'")
    put.set_defaults(run=_run_put)
    get.set_defaults(run=_run_get)


def _add_calibrate(sub: Any) -> None:
    p = sub.add_parser("calibrate", help="fit kvq codec tables on a model's own KV",
                       description="Measure the model's KV sensitivity and store a table.")
    p.add_argument("--model", default="smollm2-135m", choices=["smollm2-135m"])
    p.add_argument("--prefix-tokens", type=int, default=1024, help="cached context length")
    p.add_argument("--eval-tokens", type=int, default=256, help="tokens scored after it")
    p.add_argument("--offset", type=int, nargs="+",
                   help="sample text offsets (chars), one sample each (default: "
                   "kvstore.codec.calibrate.SAMPLE_OFFSETS)")
    p.add_argument("--group-layers", type=int, default=5, help="layers sharing bins")
    p.add_argument("--out", type=Path, default=None, help="table path (default: data dir)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bar (shown on a terminal's stderr) and no INFO log")
    p.set_defaults(run=_run_calibrate)


def _run_calibrate(args: argparse.Namespace) -> int:
    from kvstore.codec.calibrate import SAMPLE_OFFSETS, save_table
    from kvstore.codec.calibrate_model import calibrate
    from kvstore.logs import configure_logging

    configure_logging("WARNING" if args.quiet else "INFO")
    table = calibrate(args.model, args.prefix_tokens, args.eval_tokens,
                      args.offset or list(SAMPLE_OFFSETS), args.group_layers,
                      progress=not args.quiet)
    path = save_table(table, args.out)
    print(f"calibration table {table.table_id:016x} written to {path}")
    for name, bins in table.levels.items():
        print(f"  {name:14s} keys {bins['k']}  values {bins['v']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvstore", description="Tiered KV-cache store.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_serve, _add_stats, _add_put_get, _add_config, _add_calibrate):
        add(sub)
    return parser


def _run_serve(args: argparse.Namespace) -> int:
    import asyncio

    from kvstore.config import load_config
    from kvstore.logs import configure_logging
    from kvstore.server.app import check_listen, serve

    overrides: dict[str, Any] = {}
    for flag, key in (("listen", "server.listen"), ("data_dir", "tiers.disk.path"),
                      ("allow_insecure_remote", "server.allow_insecure_remote"),
                      ("redis", "tiers.redis.url"), ("log_level", "log.level"),
                      ("log_format", "log.format")):
        if getattr(args, flag) is not None:
            overrides[key] = getattr(args, flag)
    config = load_config(args.config, overrides)
    configure_logging(config.log.level, config.log.format)
    check_listen(config.server)  # refuse a bad bind before opening the tiers
    return asyncio.run(serve(config))


def _run_config_check(args: argparse.Namespace) -> int:
    from kvstore.config import key_lines, read_config
    from kvstore.config_doc import effective_toml
    from kvstore.server.app import server_problems

    config, problems, text = read_config(args.file)
    lines = key_lines(text)
    problems += [dataclasses.replace(p, line=lines.get(p.key)) for p in
                 server_problems(config.server)]
    print(f"# effective configuration of {args.file} (defaults filled in; bad keys left at "
          "their defaults)")
    print(effective_toml(config))
    for problem in problems:
        print(f"{args.file}: {problem}", file=sys.stderr)
    if problems:
        print(f"{len(problems)} error(s) in {args.file}", file=sys.stderr)
        return 1
    print(f"# {args.file}: OK")
    return 0


def _run_config_reference(args: argparse.Namespace) -> int:
    from kvstore.config_doc import reference_markdown

    print(reference_markdown())
    return 0


def _addresses(args: argparse.Namespace) -> list[str]:
    return args.address or [DEFAULT_ADDRESS]


def _run_stats(args: argparse.Namespace) -> int:
    from kvstore.client import fetch_stats

    if args.metrics:
        return _print_metrics(args)
    stats = fetch_stats(_addresses(args), token=args.token, tls_ca_file=args.tls_ca_file,
                        tls_cert_file=args.tls_cert_file, tls_key_file=args.tls_key_file,
                        timeout_s=args.timeout)
    if args.json:
        print(json.dumps(stats, indent=2))
    else:
        print_stats_table(stats, ", ".join(_addresses(args)))
    return 0


def _print_metrics(args: argparse.Namespace) -> int:
    from rich.console import Console

    from kvstore.stats_table import scrape, tables

    figures = scrape(args.metrics, args.timeout)
    if args.json:
        print(json.dumps({name: [{"labels": labels, "value": value} for labels, value in rows]
                          for name, rows in figures.samples.items()}, indent=2))
        return 0
    console = Console(width=120)
    for table in tables(figures):
        console.print(table)
    return 0


def print_stats_table(stats: dict[str, Any], address: str) -> None:
    from rich.console import Console
    from rich.table import Table

    from kvstore.stats_table import human_bytes

    table = Table(title=f"kvstore {stats['version']} at {address} — up "
                  f"{stats['uptime_ms'] / 1000:.0f} s, {stats['requests']} requests "
                  f"({stats['failed_requests']} failed)")
    for column in ("tier", "used / capacity", "objects", "hits", "misses", "hit rate",
                   "evictions", "corrupt", "errors"):
        table.add_column(column, justify="left" if column == "tier" else "right")
    for t in stats["tiers"]:
        capacity = human_bytes(t["capacity_bytes"]) if t["capacity_bytes"] else "—"
        lookups = t["hits"] + t["misses"]
        rate = f"{100 * t['hits'] / lookups:.1f}%" if lookups else "—"
        table.add_row(t["name"], f"{human_bytes(t['used_bytes'])} / {capacity}",
                      str(t["num_objects"]), str(t["hits"]), str(t["misses"]), rate,
                      str(t["evictions"]), str(t["corrupt"]), str(t["errors"]))
    Console(width=120).print(table)


def _layout_from_file(args: argparse.Namespace, tensors: dict[str, Any]) -> Any:
    from kvstore.layout import KVLayout

    kv = tensors.get("kv")
    if kv is not None:
        if kv.ndim != 5:
            raise InvalidArgument(f"'kv' must be [layers, 2, heads, n, dim], got shape "
                                  f"{tuple(kv.shape)}")
        dtype = str(kv.dtype).removeprefix("torch.")
        return KVLayout(num_layers=kv.shape[0], num_kv_heads=kv.shape[2], head_dim=kv.shape[4],
                        dtype=dtype, chunk_tokens=args.chunk_tokens)
    missing = [f for f in ("num_layers", "num_kv_heads", "head_dim", "dtype")
               if getattr(args, f, None) is None]
    if missing:
        raise InvalidArgument(f"{args.file} has no 'kv' tensor to infer the layout from; pass "
                              + ", ".join("--" + m.replace("_", "-") for m in missing))
    return KVLayout(num_layers=args.num_layers, num_kv_heads=args.num_kv_heads,
                    head_dim=args.head_dim, dtype=args.dtype, chunk_tokens=args.chunk_tokens)


def _open_client(args: argparse.Namespace) -> tuple[Any, Any]:
    from safetensors.torch import load_file

    from kvstore.client import Client

    try:
        tensors = load_file(args.file)
    except Exception as exc:  # safetensors raises its own error types, not only OSError
        raise InvalidArgument(f"cannot read safetensors file {args.file}: {exc}") from exc
    if "tokens" not in tensors:
        raise InvalidArgument(f"{args.file} has tensors {sorted(tensors)}, expected 'tokens'")
    layout = _layout_from_file(args, tensors)
    client = Client(_addresses(args), args.namespace, layout, token=args.token,
                    tls_ca_file=args.tls_ca_file, tls_cert_file=args.tls_cert_file,
                    tls_key_file=args.tls_key_file, timeout_s=args.timeout,
                    tp_rank=args.tp_rank)
    return client, tensors


def _run_put(args: argparse.Namespace) -> int:
    client, tensors = _open_client(args)
    if "kv" not in tensors:
        raise InvalidArgument(f"{args.file} has tensors {sorted(tensors)}, put needs 'kv'")
    with client:
        stored = client.put(tensors["tokens"].numpy(), tensors["kv"])
    num_tokens = tensors["tokens"].numel()
    print(f"stored {stored} of {num_tokens} tokens")
    if num_tokens % args.chunk_tokens:
        print(f"the last {num_tokens % args.chunk_tokens} tokens are not stored: only whole "
              f"{args.chunk_tokens}-token chunks are (--chunk-tokens)", file=sys.stderr)
    return 0


def _run_get(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file

    client, tensors = _open_client(args)
    tokens = tensors["tokens"]
    with client:
        kv = client.get(tokens.numpy())
    if kv is None:
        print("nothing stored for these tokens", file=sys.stderr)
        return 1
    n = kv.shape[3]
    save_file({"tokens": tokens[:n].contiguous(), "kv": kv.contiguous()}, args.out)
    print(f"wrote {n} of {tokens.numel()} tokens to {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except KVStoreError as exc:
        print(f"kvstore {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
