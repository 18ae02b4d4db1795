"""The ``ressl`` command: parse arguments, call the library, turn user mistakes into one-line errors."""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from pathlib import Path
from typing import Any, NoReturn

from ressl import allocator, config, dist
from ressl.checkpoint import CheckpointError, CheckpointWriteError
from ressl.config import FIELDS, ConfigError
from ressl.folder import DataError
from ressl.train import Interrupted, NonFiniteLoss

USER_ERRORS = (ConfigError, DataError, CheckpointError)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (and a suggestion for a mistyped flag), exit code 2."""

    def error(self, message: str) -> NoReturn:
        if "unrecognized arguments" in message:
            flags = [a for a in message.split(":", 1)[1].split() if a.startswith("--")]
            parsers = [self] + [p for a in self._actions if isinstance(a, argparse._SubParsersAction) for p in a.choices.values()]
            known = sorted({o for p in parsers for a in p._actions for o in a.option_strings if o.startswith("--")})
            for flag in flags:
                hint = difflib.get_close_matches(flag.split("=")[0], known, n=1)
                if hint:
                    message += f" (did you mean {hint[0]}?)"
                    break
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def _field_help(name: str) -> str:
    kinds, optional = config.field_types(name)
    default = FIELDS[name].default
    return f"{'/'.join(k.__name__ for k in kinds)}{' or none' if optional else ''}, default {default!r}"


def add_config_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    group = parser.add_argument_group("configuration fields (override the preset; see ressl/presets/*.yaml)")
    for name in FIELDS:
        if name in skip or name == "extra":
            continue
        kinds, _ = config.field_types(name)
        extra: dict[str, Any] = {"nargs": "?", "const": "true"} if kinds[0] is bool else {}
        group.add_argument(f"--{name}", dest=f"cfg_{name}", default=argparse.SUPPRESS, metavar="VALUE",
                           help=_field_help(name), **extra)


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_")}


def build_parser() -> Parser:
    parser = Parser(prog="ressl", allow_abbrev=False, description="ReSSL: relational self-supervised pretraining and evaluation.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    p = sub.add_parser("pretrain", allow_abbrev=False, help="pretrain an encoder by ReSSL",
                       description="Pretrain by ReSSL. With no arguments: the embedded digits demo, a few minutes on a CPU.")
    p.add_argument("--preset", help=f"defaults to start from: {', '.join(config.preset_names())}")
    add_config_flags(p)

    for name, what in (("knn", "weighted kNN accuracy of a checkpoint's frozen backbone"),
                       ("linear", "linear-probe accuracy of a checkpoint's frozen backbone")):
        e = sub.add_parser(name, allow_abbrev=False, help=what, description=what.capitalize() + ".")
        e.add_argument("--checkpoint", required=True, help="RUN_DIR/checkpoint.pt")
        e.add_argument("--data", help="dataset directory (default: the one the run was trained on)")
        e.add_argument("--dataset", help="dataset name (default: the run's)")
        e.add_argument("--teacher", action="store_true", help="evaluate the teacher's backbone instead of the student's")
        e.add_argument("--device", default="auto")
        e.add_argument("--batch_size", type=int, default=512, help="images per forward pass")
        e.add_argument("--workers", type=int, default=4)
        if name == "knn":
            e.add_argument("--k", type=int, default=200, help="neighbours (default 200)")
            e.add_argument("--temperature", type=float, default=0.1, help="vote temperature (default 0.1)")
        else:
            e.add_argument("--epochs", type=int, default=100, help="probe epochs (default 100, the paper)")
            e.add_argument("--lr", type=float, default=0.1, help="probe learning rate on standardised features")
            e.add_argument("--weight_decay", type=float, default=0.0)
            e.add_argument("--augment", action="store_true",
                           help="random crops and flips of the training images every epoch (a backbone pass per epoch) "
                                "instead of features cached once (the fast default)")
    x = sub.add_parser("export", allow_abbrev=False, help="write a checkpoint's backbone as safetensors (torchvision keys)",
                       description="Write the student's (or teacher's) backbone with torchvision's key names.")
    x.add_argument("--checkpoint", required=True, help="RUN_DIR/checkpoint.pt")
    x.add_argument("--out", required=True, help="output file, e.g. backbone.safetensors")
    x.add_argument("--teacher", action="store_true", help="export the teacher's backbone instead of the student's")
    add_report_commands(sub)
    return parser


def cmd_export(args: argparse.Namespace) -> int:
    from ressl.export import export_backbone

    meta = export_backbone(args.checkpoint, args.out, args.teacher)
    print(f"wrote {args.out}: {meta['network']} {meta['architecture']} (width {meta['width']}, small stem {meta['small_stem']})")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from ressl.train import pretrain

    values = overrides(args)
    preset = args.preset
    if preset is None and values.get("dataset") in config.preset_names():
        preset = values["dataset"]  # --dataset cifar10 starts from the cifar10 preset
    elif preset is None and "dataset" not in values and "data" not in values:
        preset = "digits"  # no arguments: the embedded demo
    cfg = config.resolve(preset, values)
    pretrain(cfg)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ressl.evaluate import evaluate_checkpoint

    extra = {"k": args.k, "temperature": args.temperature} if args.command == "knn" else {
        "epochs": args.epochs, "lr": args.lr, "weight_decay": args.weight_decay, "augment": args.augment}
    result = evaluate_checkpoint(args.checkpoint, args.command, args.data, args.dataset, args.teacher, args.device,
                                 args.batch_size, args.workers, **extra)
    if dist.is_main():
        print(f"{args.command}: top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%")
        print(json.dumps(result))
    return 0


# --- report and embed: what a run learned (ressl.report) ---------------------------------------


def add_report_commands(sub: Any) -> None:
    r = sub.add_parser("report", allow_abbrev=False, help="write RUN_DIR/report.md and report.html: curves, embedding map, retrieval",
                       description="Write RUN_DIR/report.md and RUN_DIR/report.html (PNGs embedded, opens offline): the "
                                   "configuration, final metrics, loss/learning-rate/kNN/health curves, a 2-D map of the "
                                   "test embeddings and a retrieval grid.")
    r.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (the --out of ressl pretrain)")
    r.add_argument("--data", help="dataset directory for the embedding plots (default: the one the run was trained on)")
    r.add_argument("--dataset", help="dataset name (default: the run's)")
    r.add_argument("--no-embeddings", dest="embeddings", action="store_false",
                   help="skip the embedding map and retrieval grid (no checkpoint or data needed)")
    r.add_argument("--max_points", type=int, default=2000, help="test images in the 2-D map (default 2000)")
    r.add_argument("--device", default="auto")
    r.add_argument("--batch_size", type=int, default=512, help="images per forward pass")
    r.add_argument("--workers", type=int, default=4)

    m = sub.add_parser("embed", allow_abbrev=False, help="write a checkpoint's backbone features of a data set as .npy",
                       description="Backbone features (N, F) float32 of a split, in order, and FILE.files.txt naming each "
                                   "row (the image path for folders, SPLIT:INDEX for in-memory sets).")
    m.add_argument("--checkpoint", required=True, help="RUN_DIR/checkpoint.pt")
    m.add_argument("--data", required=True, help="dataset directory: an image folder, train.npz/test.npz, or a torchvision root")
    m.add_argument("--dataset", help="dataset name (default: the run's; 'folder' or 'npz' for other data)")
    m.add_argument("--split", choices=("train", "test"), default="train", help="which split (default train)")
    m.add_argument("--teacher", action="store_true", help="the teacher's backbone instead of the student's")
    m.add_argument("--out", required=True, help="output file, e.g. features.npy")
    m.add_argument("--device", default="auto")
    m.add_argument("--batch_size", type=int, default=512, help="images per forward pass")
    m.add_argument("--workers", type=int, default=4)


def cmd_report(args: argparse.Namespace) -> int:
    from ressl.report import make_report

    if args.max_points < 1:
        raise ConfigError(f"--max_points must be at least 1, got {args.max_points}")
    report = make_report(args.run_dir, args.data, args.dataset, args.embeddings, args.device, args.batch_size,
                         args.workers, args.max_points, say=lambda m: print(m, file=sys.stderr, flush=True))
    print(f"wrote {report.markdown} and {report.html} ({len(report.images)} plots)")
    for note in report.notes:
        print(f"  left out: {note}")
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    from ressl.report import embed

    out, files, (n, dim) = embed(args.checkpoint, args.data, args.out, args.dataset, args.split, args.teacher,
                                 args.device, args.batch_size, args.workers)
    print(f"wrote {out}: {n} x {dim} float32 features ({args.split} split), row origins in {files}")
    return 0


REPORT_COMMANDS = {"report": cmd_report, "embed": cmd_embed}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    allocator.keep_freed_memory()  # CPU steps reuse their memory instead of page-faulting it in again
    code = _run(args)
    dist.leave(together=code == 0)  # under torchrun: close the process group before the interpreter exits
    return code


def _run(args: argparse.Namespace) -> int:
    try:
        if args.command == "pretrain":
            return cmd_pretrain(args)
        if args.command == "export":
            return cmd_export(args)
        if args.command in REPORT_COMMANDS:
            return REPORT_COMMANDS[args.command](args)
        return cmd_evaluate(args)
    except (NonFiniteLoss, CheckpointWriteError) as err:  # not the user's input: exit 1
        print(f"ressl {args.command}: error: {err}", file=sys.stderr)
        return 1
    except USER_ERRORS as err:
        print(f"ressl {args.command}: error: {err}", file=sys.stderr)
        return 2
    except Interrupted as err:
        print(f"ressl {args.command}: {err}", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        out = getattr(args, "cfg_out", None)
        print("\nressl: interrupted" + (f"; the last checkpoint is in {Path(out)}" if out else ""), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
