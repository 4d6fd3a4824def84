"""Every reference in the repository can be followed by a user: no citation of documents that are not in it."""
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# notes that live outside the repository; cite the papers or the authors' code (file at commit) instead
FORBIDDEN = ("spec §", "paper-numbers.md", "voco-method-spec", "method spec", "../shared", "/work/shared")


def tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [f for f in out.splitlines() if f != "tests/test_references.py"]


def hits(files: list[str], root: Path = ROOT) -> list[str]:
    """'path:line: text' for every line of the files that contains a forbidden reference."""
    found = []
    for rel in files:
        path = root / rel
        if not path.is_file():
            continue
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            continue  # binary file
        found += [f"{rel}:{i}: {line.strip()[:120]}" for i, line in enumerate(lines, 1)
                  if any(s in line for s in FORBIDDEN)]
    return found


def test_hits_finds_each_forbidden_reference(tmp_path):
    lines = ["clean line", "see method spec §2.1", "numbers in paper-numbers.md", "voco-method-spec.md",
             "path ../shared/x", "spec 2.1 without the sign", "the method spec says"]
    (tmp_path / "a.md").write_text("\n".join(lines), encoding="utf-8")
    (tmp_path / "b.bin").write_bytes(b"\xff\xfe spec \xa7")
    assert [h.split(":")[1] for h in hits(["a.md", "b.bin", "missing.txt"], tmp_path)] == ["2", "3", "4", "5", "7"]


def test_no_tracked_file_cites_notes_outside_the_repository():
    found = hits(tracked_files())
    assert not found, f"{len(found)} references to notes outside the repository:\n" + "\n".join(found)
