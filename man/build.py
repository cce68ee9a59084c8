#!/usr/bin/env python3
"""Generate man/epmd.1 from man/epmd.rst.

Uses docutils' man page writer (what its rst2man command runs), then tidies
two things mandoc's lint flags in that writer's output: a paragraph macro
right after a section heading, and a lower-case title in .TH.  The version
comes from ``__version__`` in epmd.py (the one place it is written): it is
added to the page's field list as ``:Version: epmd.py X.Y.Z``.

    python3 man/build.py            # writes man/epmd.1
    python3 man/build.py --check    # exits 1 if man/epmd.1 is stale
"""

import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "epmd.rst"
TARGET = HERE / "epmd.1"
PROGRAM = HERE.parent / "epmd.py"


def version(program=PROGRAM):
    """The ``__version__`` string of epmd.py, read without importing it."""
    m = re.search(r'^__version__ = "([^"]+)"$', program.read_text(encoding="utf-8"), re.M)
    if not m:
        raise SystemExit("no __version__ in %s" % program)
    return m.group(1)


def option_tag(tp):
    """The tag line of one entry of a reST option list, rewritten.

    The manpage writer emits ``.BI \\-d\\fP,\\fB  \\-d\\fB ebug`` for
    ``-d, -debug`` (shown as ``-d,-debug``) and ``.B \\-port no`` for an option
    with an argument (the argument in bold).  *tp* is ``.TP`` and that line;
    returns the line as ``\\fB-d\\fP, \\fB-debug\\fP`` and
    ``\\fB-port\\fP \\fIno\\fP``.
    """
    line = tp.split("\n", 1)[1]
    macro, _, arg = line.partition(" ")
    if macro == ".BI":          # its spaces only separate the macro's arguments
        arg = re.sub(r"\s+", "", re.sub(r"\\f[BIPR]|\\ ", "", arg))
    tags = []
    for option in arg.split(","):
        name, _, param = option.strip().partition(" ")
        tags.append("\\fB%s\\fP" % name + (" \\fI%s\\fP" % param if param else ""))
    return ", ".join(tags)


def render(source=SOURCE):
    """Return the roff text of the man page for the reST file *source*."""
    from docutils.core import publish_string

    text = source.read_text(encoding="utf-8")
    text = re.sub(r"^(:Manual group: .*\n)", r"\1:Version: epmd.py %s\n" % version(), text, count=1,
                  flags=re.M)
    roff = publish_string(text, source_path=str(source),
                          writer_name="manpage",
                          settings_overrides={"report_level": 2, "halt_level": 2,
                                              "output_encoding": "unicode"})
    if isinstance(roff, bytes):
        roff = roff.decode("utf-8")
    roff = re.sub(r"^(\.SH [^\n]*\n)\.sp\n", r"\1", roff, flags=re.M)
    roff = re.sub(r"^\.SH Name$", ".SH NAME", roff, flags=re.M)
    roff = re.sub(r"^(\.TP\n)\.BI? (\\-[^\n]*)$", lambda m: m.group(1) + option_tag(m.group(0)), roff,
                  flags=re.M)
    roff = re.sub(r'^\.TH "([^"]*)"', lambda m: '.TH "%s"' % m.group(1).upper(), roff, flags=re.M)
    return roff


def main(argv):
    roff = render()
    if "--check" in argv:
        if not TARGET.exists() or TARGET.read_text(encoding="utf-8") != roff:
            sys.stderr.write("%s is stale: run `make man`\n" % TARGET)
            return 1
        return 0
    TARGET.write_text(roff, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
