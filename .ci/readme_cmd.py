"""Print the README command marked `<!-- ci:NAME -->` (the next fenced block), so CI runs exactly what it says."""

import pathlib
import re
import sys

name = sys.argv[1]
text = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
match = re.search(rf"<!-- ci:{re.escape(name)} -->\s*```bash\n(.*?)```", text, re.S)
if not match:
    sys.exit(f"README.md has no `<!-- ci:{name} -->` command block")
print(match.group(1).strip())
