"""`dvc plots show` and `dvc plots diff` as pages that open offline.

    python -m stages.plots show                # the workspace's plots
    python -m stages.plots diff                # workspace against HEAD
    python -m stages.plots diff HEAD~1         # any arguments of `dvc plots diff`/`show` pass through

DVC's default page loads vega, vega-lite and vega-embed from a CDN, so it is blank offline. This
runs DVC with our template (plots_template.html, which loads `vega-bundle.js` beside the page)
and writes that bundle, vega 5, vega-lite 5 and vega-embed 6 as vl-convert-python ships them,
next to `<out>/index.html` (`-o`/`--out`, default dvc_plots), then prints the page's path.
"""

from __future__ import annotations

import re
import subprocess
import sys
import webbrowser
from pathlib import Path

from stages.errors import UserError, run_stage
from stages.files import write_text_atomic

TEMPLATE = Path(__file__).with_name("plots_template.html")
BUNDLE = "vega-bundle.js"
# DVC's templates are Vega-Lite 5 specs (some still use v4's `selection`, which Vega-Lite 6 dropped).
VEGA_LITE_VERSION = "5.21"
DEFAULT_OUT = "dvc_plots"
# DVC writes each Vega spec into the page as `var spec = <json.dumps of it>;` on one line.
SPEC_LINE = re.compile(r"^([ \t]*var spec = )(.*);$", re.MULTILINE)


def split_out(args: list[str]) -> tuple[list[str], str]:
    """The arguments without `-o`/`--out`, and that output folder (the default if absent)."""
    rest: list[str] = []
    out = DEFAULT_OUT
    iterator = iter(args)
    for arg in iterator:
        if arg in ("-o", "--out"):
            out = next(iterator, None) or ""
            if not out:
                raise UserError(f"{arg} needs a folder")
        elif arg.startswith("--out="):
            out = arg.removeprefix("--out=")
        else:
            rest.append(arg)
    return rest, out


def write_bundle(folder: Path) -> Path:
    """Write vega, vega-lite and vega-embed as one script in `folder`, unless it is there already."""
    import vl_convert

    stamp = (
        f"// vega {vl_convert.get_vega_version()}, vega-lite {VEGA_LITE_VERSION}, "
        f"vega-embed {vl_convert.get_vega_embed_version()}, from vl-convert-python\n"
    )
    path = folder / BUNDLE
    if path.is_file():
        with path.open(encoding="utf-8") as existing:
            if existing.readline() == stamp:
                return path
    # The default bundle sets window.vegaEmbed, vega and vegaLite, which DVC's plot divs call.
    # Atomically: a bundle cut short by a full disk must not pass for complete next time.
    write_text_atomic(path, stamp + vl_convert.javascript_bundle(vl_version=VEGA_LITE_VERSION))
    return path


def escape_specs(page: Path) -> None:
    """Leave no "<" in the page's Vega specs: DVC writes them into <script> elements as json.dumps
    leaves them, so a class name holding "</script>" (a CSV layout's label) ended the script there
    and the rest showed as HTML, and one holding "<!--<script>" swallowed the page's later scripts.
    In JSON "<" is only ever inside a string, where "\\u003c" means the same."""
    text = page.read_text(encoding="utf-8")
    escaped = SPEC_LINE.sub(lambda match: match[1] + match[2].replace("<", "\\u003c") + ";", text)
    if escaped != text:
        write_text_atomic(page, escaped)


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    usage = "usage: python -m stages.plots {show|diff} [dvc plots arguments...]"
    if args[:1] in (["-h"], ["--help"]):
        print(f"{usage}\n\n{(__doc__ or '').strip()}")
        return
    if not args or args[0] not in ("show", "diff"):
        raise UserError(usage)
    command, rest = args[0], args[1:]
    rest, out = split_out(rest)
    # DVC would open the page before the scripts are beside it, so this opens it afterwards.
    open_page = "--open" in rest
    rest = [arg for arg in rest if arg != "--open"]

    page = Path(out).resolve() / "index.html"
    # A page left from an earlier run must not pass for this one when DVC finds no plots.
    page.unlink(missing_ok=True)
    dvc = [sys.executable, "-m", "dvc", "plots", command, "--html-template", str(TEMPLATE), "-o", out]
    status = subprocess.run([*dvc, *rest], check=False).returncode
    if status != 0:
        raise SystemExit(status)
    if not page.is_file():
        # --json and --show-vega print instead of writing a page; otherwise DVC said why.
        return
    escape_specs(page)
    write_bundle(page.parent)
    print(f"Open {page} (works offline)")
    if open_page:
        webbrowser.open(page.as_uri())


if __name__ == "__main__":
    run_stage(main)
