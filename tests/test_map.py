"""The module docstring of epmd.py is an exact map, and stays one.

It promises that the sections go bottom up (each uses only what the sections
above it define), lists each section's names in the file's order, and the
Epmd class docstring indexes every method by role.  These tests read the
file with `ast` and fail, naming the place, when a change breaks one of
those promises: a developer adding a section or a function is told.
"""

import ast
import re

from helpers import EPMD_PY

SOURCE = EPMD_PY.read_text(encoding="utf-8")
LINES = SOURCE.splitlines()
TREE = ast.parse(SOURCE)
BANNER = re.compile(r"^# -{20,}\s*$")


def sections():
    """[(first line number, title)] of the banner-delimited sections."""
    out = []
    for i, line in enumerate(LINES[:-1]):
        if (BANNER.match(line) and LINES[i + 1].startswith("# ") and not BANNER.match(LINES[i + 1])
                and (i == 0 or not LINES[i - 1].startswith("# "))):
            out.append((i + 2, LINES[i + 1][2:]))
    return out


SECTIONS = sections()


def section_of(lineno):
    return sum(1 for start, _ in SECTIONS if start <= lineno)


def top_level():
    """name -> section index of every top-level def, class and assignment."""
    top = {}
    for node in TREE.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            top[node.name] = section_of(node.lineno)
        elif isinstance(node, ast.Assign):
            for t in node.targets:
                if isinstance(t, ast.Name):
                    top.setdefault(t.id, section_of(node.lineno))
    return top


def local_names(fn):
    """Names a function binds itself (arguments, assignments, imports,
    loop variables, nested defs), which shadow top-level ones."""
    names = set()
    for node in ast.walk(fn):
        if isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node is not fn:
            names.add(node.name)
    return names


def test_sections_go_bottom_up():
    """No top-level function or class uses a top-level name that a later
    section defines."""
    top = top_level()
    wrong = []
    for node in TREE.body:
        if not isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            continue
        here = section_of(node.lineno)
        shadowed = local_names(node) if isinstance(node, ast.FunctionDef) else set()
        for x in ast.walk(node):
            if (isinstance(x, ast.Name) and isinstance(x.ctx, ast.Load) and x.id not in shadowed
                    and top.get(x.id, 0) > here):
                wrong.append("%s (line %d) uses %s, which the later section %r defines"
                             % (node.name, x.lineno, x.id, SECTIONS[top[x.id] - 1][1]))
    assert not wrong, "\n".join(sorted(set(wrong)))


def docstring_map():
    """The section index of the module docstring: [(label, text)]."""
    doc = ast.get_docstring(TREE)
    block = doc.split("Sections.", 1)[1].split("\n\n", 2)[1]
    entries = []
    for line in block.splitlines():
        m = re.match(r"^    (\S.{25})\s(.*)$", line)
        if m and m.group(1).strip():
            entries.append([m.group(1).strip(), m.group(2)])
        elif entries:
            entries[-1][1] += " " + line.strip()
    return entries


def known_names():
    """Every top-level name, and every attribute a top-level class defines."""
    names = set(top_level())
    for node in TREE.body:
        if isinstance(node, ast.ClassDef):
            for item in ast.walk(node):
                if isinstance(item, ast.FunctionDef):
                    names.add(item.name)
                elif isinstance(item, ast.Attribute) and isinstance(item.ctx, ast.Store):
                    names.add(item.attr)
    return names


def code_like(text):
    """The words of *text* that look like code: with an underscore, or
    CamelCase (OTP's C names in parentheses included)."""
    out = []
    for word in re.findall(r"(?<![\w./{])[A-Za-z_][A-Za-z0-9_]*(?![\w./{(])", text):
        if "_" in word.strip("_") or re.match(r"^[A-Z][a-z]+[A-Z]", word):
            out.append(word)
    return out


# Names the map mentions that are not ours to define: C source files' names
# and the fields of OTP's structs the map compares with.
NOT_OURS = {"epmd_srv", "epmd_cli"}


def test_docstring_map_names_exist():
    """Every code-like name in the docstring's section index and in its list
    of our own names is defined in the file (a function, class, method or
    constant)."""
    doc = ast.get_docstring(TREE)
    own = doc.split("Our own names", 1)[1].split("\n\n", 1)[0]
    names = known_names()
    missing = []
    for label, text in docstring_map() + [["our own names", own]]:
        for word in code_like(text):
            if word not in names and word not in NOT_OURS:
                missing.append("%s: %s" % (label, word))
    assert not missing, "the docstring names what the file does not define:\n" + "\n".join(missing)


def test_docstring_map_follows_the_sections():
    """The docstring's index lists the file's sections, in the file's order."""
    labels = [label for label, _ in docstring_map()]
    titles = [title.lower() for _, title in SECTIONS]
    assert len(labels) == len(titles), (labels, titles)
    for label, title in zip(labels, titles):
        assert title.startswith(label.split()[0]), (label, title)


def test_epmd_docstring_indexes_every_method():
    """Epmd's "Methods by role" names every method Epmd (and its Handover
    mixin) defines."""
    classes = {n.name: n for n in TREE.body if isinstance(n, ast.ClassDef)}
    doc = ast.get_docstring(classes["Epmd"])
    roles = doc.split("Methods by role", 1)[1]
    missing = []
    for cls in ("Epmd", "Handover"):
        for item in classes[cls].body:
            if isinstance(item, ast.FunctionDef) and not item.name.startswith("__"):
                if not re.search(r"\b%s\b" % re.escape(item.name), roles):
                    missing.append("%s.%s" % (cls, item.name))
    assert not missing, "Epmd's docstring does not index: " + ", ".join(missing)


MAX_FUNCTION_LINES = 50


def test_no_long_function_without_a_reason():
    """No function is over MAX_FUNCTION_LINES lines unless a comment in its
    first lines says why it must be ("# Over 50 lines ...")."""
    long_ones = []
    for node in ast.walk(TREE):
        if isinstance(node, ast.FunctionDef):
            size = node.end_lineno - node.lineno + 1
            head = LINES[node.lineno:node.lineno + 3]
            if size > MAX_FUNCTION_LINES and not any(
                    line.strip().startswith("# Over %d lines" % MAX_FUNCTION_LINES) for line in head):
                long_ones.append("%s (line %d): %d lines" % (node.name, node.lineno, size))
    assert not long_ones, "\n".join(long_ones)


def contract_list(doc, label):
    """The names after *label* in a docstring, up to the next full stop."""
    text = doc.split(label, 1)[1].split(".\n", 1)[0]
    return set(re.findall(r"\b([a-z_][a-z0-9_]*)\b", text))


def test_handover_contract_is_exact():
    """The Handover mixin's docstring lists exactly what it reads and writes
    of Epmd, the Epmd methods it calls, and its methods Epmd calls."""
    classes = {n.name: n for n in TREE.body if isinstance(n, ast.ClassDef)}
    mixin, daemon = classes["Handover"], classes["Epmd"]
    own = {f.name for f in mixin.body if isinstance(f, ast.FunctionDef)}
    theirs = {f.name for f in daemon.body if isinstance(f, ast.FunctionDef)}
    reads, writes = set(), set()
    for node in ast.walk(mixin):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                and node.value.id == "self":
            (writes if isinstance(node.ctx, ast.Store) else reads).add(node.attr)
    called_back = {node.attr for node in ast.walk(daemon)
                   if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                   and node.value.id == "self" and node.attr in own}
    doc = ast.get_docstring(mixin)
    assert contract_list(doc, "Reads:") - {"and", "the", "options", "named", "by"} == \
        reads - own - theirs
    assert contract_list(doc, "Writes:") - {"its", "own", "taken", "once"} == writes
    assert contract_list(doc, "Calls:") & theirs == reads & theirs
    assert contract_list(doc, "Called by Epmd:") & own == called_back
