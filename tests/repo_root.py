"""Running the package from the repository root, where the checkout's own folders come first on sys.path.

`check_from_repo_root` is shared by tests/test_layout.py (the running environment, an editable install under
`make test`) and tests/test_packaging.py (a venv holding the built wheel, a non-editable install).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

IMPORTS = (
    "import json, kernels, transformers.modeling_utils, llm2vec_fast.demo, llm2vec_fast.kernels.attention as a\n"
    "from llm2vec_fast import native\n"
    "print(json.dumps(dict(hub_kernels=kernels.__file__, attention=a.__file__, csrc=native.CSRC)))\n"
)


def _run(python, args, env):
    result = subprocess.run([str(python), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{args} from the repository root failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def check_from_repo_root(python, env) -> None:
    """From the repository root, with Hugging Face's `kernels` installed: transformers' modeling code and the demo
    import, `import kernels` is Hugging Face's package, our kernels load as llm2vec_fast.kernels (from the
    checkout, which comes first on sys.path there, whatever was installed), the GPU compile tool answers --help,
    and pytest collects test modules."""
    info = json.loads(_run(python, ["-c", IMPORTS], env).strip().splitlines()[-1])
    assert not info["hub_kernels"].startswith(str(REPO) + "/kernels"), info
    assert info["attention"] == str(REPO / "llm2vec_fast" / "kernels" / "attention.py"), info
    assert info["csrc"] == str(REPO / "llm2vec_fast" / "csrc"), info
    assert "--sweep" in _run(python, ["-m", "llm2vec_fast.kernels.gpu_compile", "--help"], env)
    # Modules that need neither Triton nor the test extras, so that a bare wheel install collects them too.
    collected = _run(python, ["-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                              "tests/test_inputs.py", "tests/test_settings.py"], env)
    assert "test_inputs.py::" in collected, collected
