#!/usr/bin/env python3
"""Generate man/epmd.1 from man/epmd.rst.

Uses docutils' man page writer (what its rst2man command runs), then tidies
two things mandoc's lint flags in that writer's output: a paragraph macro
right after a section heading, and a lower-case title in .TH.

    python3 man/build.py            # writes man/epmd.1
    python3 man/build.py --check    # exits 1 if man/epmd.1 is stale
"""

import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "epmd.rst"
TARGET = HERE / "epmd.1"


def render(source=SOURCE):
    """Return the roff text of the man page for the reST file *source*."""
    from docutils.core import publish_string

    roff = publish_string(source.read_text(encoding="utf-8"), source_path=str(source),
                          writer_name="manpage",
                          settings_overrides={"report_level": 2, "halt_level": 2,
                                              "output_encoding": "unicode"})
    if isinstance(roff, bytes):
        roff = roff.decode("utf-8")
    roff = re.sub(r"^(\.SH [^\n]*\n)\.sp\n", r"\1", roff, flags=re.M)
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
