"""The package as a user gets it, and the old library's README run on it.

A wheel is built from a copy of this checkout (nothing is written into the repository) and
installed into a fresh venv outside it. Every command then runs from a directory that has its own
junk `settings.py`, `app.py` and `jobs.py` and no PYTHONPATH, so only the installed package can
answer: the CLI (`--help`, `--version`, `run --in-process`, `status`) and every example of the
`replicate-batch-process` README with its import line changed to `replicate_generation.compat`,
each as its own script in its own directory, against the simulator.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from replicate_generation.devtools.simulator import Simulator, output_bytes
from servers import ROOT

TOKEN = "r8_install_test_token"
# The tokens the old README's examples pay with: no more to be printed than ours.
README_TOKENS = ("r8_your_token_here", "r8_your_real_token_here")
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
JUNK_MODULES = ("settings.py", "app.py", "jobs.py")
OLD_IMPORT = re.compile(r"^(\s*)from replicate_batch_process(?:\.\w+)? import ", re.MULTILINE)
PNG = output_bytes("png", "a reference png")
JPEG = output_bytes("jpg", "a reference jpeg")

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="builds a Linux venv")


# --------------------------------------------------------------------------- the install


@dataclass(frozen=True)
class Install:
    venv: Path
    wheel: Path

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    def command(self, name: str) -> Path:
        return self.venv / "bin" / name


def _step(argv: list[str], cwd: Path, what: str) -> subprocess.CompletedProcess[str]:
    # Building and installing talk to PyPI, so they keep the developer's pip configuration.
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=900,
                          check=False, env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-20:])
        pytest.fail(f"{what} exited {done.returncode}. Is PyPI reachable? (CI must reach it; "
                    f"this is a failure, not a skip)\n{tail}", pytrace=False)
    return done


def _build_wheel(root: Path) -> Path:
    """Build from a copy: setuptools writes build/ and egg-info beside the sources."""
    source = root / "source"
    source.mkdir()
    for name in ("pyproject.toml", "requirements.txt"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "replicate_generation", source / "replicate_generation",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = root / "dist"
    _step([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(dist), str(source)],
          source, "pip wheel")
    [wheel] = dist.glob("*.whl")
    return wheel


@pytest.fixture(scope="session")
def installed() -> Iterator[Install]:
    """Built and installed once per session (the slow part); removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="install-"))
    try:
        wheel = _build_wheel(root)
        venv = root / "venv"
        _step([sys.executable, "-m", "venv", str(venv)], root, "python -m venv")
        _step([str(venv / "bin" / "python"), "-m", "pip", "install", str(wheel)], root,
              "pip install the wheel")
        yield Install(venv=venv, wheel=wheel)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _env(sim: Simulator, work: Path, install: Install) -> dict[str, str]:
    """Nothing of the developer's environment: the venv's commands, the simulator, tmp state."""
    return {"PATH": f"{install.venv / 'bin'}:{SYSTEM_PATH}", "HOME": str(work),
            "PYTHONIOENCODING": "utf-8", "REPLICATE_BASE_URL": sim.base_url,
            "REPLICATE_API_TOKEN": TOKEN, "STATE_FILE": str(work / "state" / "state.sqlite3"),
            "OUTPUT_DIR": str(work / "jobs"), "POLL_INTERVAL_SECONDS": "0.02",
            "REPLICATE_REQUESTS_PER_MINUTE": "6000", "REPLICATE_CREATE_BURST": "50",
            "REPLICATE_POLLS_PER_MINUTE": "60000"}


def _project_dir(path: Path) -> Path:
    """A user's directory whose own settings/app/jobs modules must never be imported."""
    path.mkdir(parents=True, exist_ok=True)
    for name in JUNK_MODULES:
        (path / name).write_text(f"raise RuntimeError('the user\\'s own {name} was imported')\n")
    return path.resolve()


def _run(argv: list[str], work: Path, sim: Simulator,
         install: Install) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, cwd=work, env=_env(sim, work, install), capture_output=True,
                          text=True, timeout=120, check=False)
    for token in (TOKEN, *README_TOKENS):
        assert token not in done.stdout + done.stderr  # no token in any output
    return done


# --------------------------------------------------------------------------- the package


def test_only_the_package_lands_in_site_packages(installed: Install, tmp_path: Path) -> None:
    work = _project_dir(tmp_path / "project")
    probe = ("import replicate_generation, sysconfig; "
             "print(sysconfig.get_path('purelib')); print(replicate_generation.__file__)")
    done = subprocess.run([str(installed.python), "-c", probe], cwd=work, capture_output=True,
                          text=True, check=True, env={"PATH": SYSTEM_PATH})
    site, module = map(Path, done.stdout.split())
    assert module == site / "replicate_generation" / "__init__.py"
    [dist_info] = site.glob("replicate_generation-*.dist-info")
    record = [line.split(",")[0] for line in (dist_info / "RECORD").read_text().splitlines()]
    tops = {entry.split("/")[0] for entry in record if not entry.startswith("../")}
    assert tops == {"replicate_generation", dist_info.name}
    scripts = {entry for entry in record if entry.startswith("../")}
    assert scripts == {"../../../bin/replicate-generation"}
    if (dist_info / "top_level.txt").exists():
        assert (dist_info / "top_level.txt").read_text().split() == ["replicate_generation"]


def test_commands_answer_from_another_directory(installed: Install, sim: Simulator,
                                                tmp_path: Path) -> None:
    work = _project_dir(tmp_path / "project")
    helped = _run([str(installed.command("replicate-generation")), "--help"], work, sim,
                  installed)
    assert helped.returncode == 0, helped.stderr
    assert all(word in helped.stdout for word in ("run", "status", "serve"))
    version = _run(["python", "-m", "replicate_generation", "--version"], work, sim, installed)
    assert version.returncode == 0, version.stderr
    expected = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert version.stdout.strip() == f"replicate-generation {expected}"


def test_cli_runs_a_csv_in_process_and_shows_status(installed: Install, sim: Simulator,
                                                    tmp_path: Path) -> None:
    work = _project_dir(tmp_path / "project")
    (work / "requests.csv").write_text("prompt,model_name,aspect_ratio,output\n"
                                       "a red fox,flux-dev,16:9,foxes/red\n"
                                       "a blue whale,qwen/qwen-image,,whales/blue.png\n")
    cli = str(installed.command("replicate-generation"))
    done = _run([cli, "run", "requests.csv", "--in-process", "--no-progress"], work, sim,
                installed)
    assert done.returncode == 0, done.stderr
    made = _by_prompt(sim)
    assert {prompt: p["model"] for prompt, p in made.items()} == {
        "a red fox": "black-forest-labs/flux-dev", "a blue whale": "qwen/qwen-image"}
    assert made["a red fox"]["input"]["aspect_ratio"] == "16:9"
    _assert_made_by(work / "foxes" / "red.webp", made["a red fox"], "webp")
    _assert_made_by(work / "whales" / "blue.webp", made["a blue whale"], "webp")
    manifest = [json.loads(line) for line in
                (work / "requests.csv.manifest.jsonl").read_text().splitlines()]
    assert [(m["index"], m["success"]) for m in manifest] == [(0, True), (1, True)]
    status = _run([cli, "status", "--json"], work, sim, installed)
    assert status.returncode == 0, status.stderr
    shown = json.loads(status.stdout)
    assert (shown["in_flight"], shown["creates_last_minute"]) == (0, 2)
    assert shown["state_file"] == str(work / "state" / "state.sqlite3")


# --------------------------------------------------------------------------- old README helpers


def migrate(old_source: str) -> str:
    """The one change a migrating user makes: each old import line names the compat module."""
    new_source, count = OLD_IMPORT.subn(r"\1from replicate_generation.compat import ",
                                        old_source)
    assert count, "the example imports nothing from replicate_batch_process"
    return new_source


def run_example(installed: Install, sim: Simulator, work: Path, old_source: str,
                files: Mapping[str, bytes] | None = None) -> subprocess.CompletedProcess[str]:
    """Write the migrated example as its own script in its own project directory and run it."""
    work = _project_dir(work)
    for name, data in (files or {}).items():
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).write_bytes(data)
    script = work / "example.py"
    script.write_text(migrate(textwrap.dedent(old_source)))
    return _run([str(installed.python), str(script)], work, sim, installed)


def _by_prompt(sim: Simulator, token: str = TOKEN) -> dict[str, dict[str, Any]]:
    made = sim.predictions(token)
    prompts = [str(p["input"]["prompt"]) for p in made]
    assert len(set(prompts)) == len(prompts), f"a prompt was created twice: {prompts}"
    return dict(zip(prompts, made, strict=True))


def _assert_made_by(path: Path, prediction: dict[str, Any], ext: str) -> None:
    """The file holds exactly that prediction's first output (a picture of its own prompt)."""
    given = prediction["input"]
    expected = output_bytes(ext, f"{prediction['id']}/0", prompt=str(given.get("prompt") or ""),
                            aspect_ratio=given.get("aspect_ratio"))
    assert path.read_bytes() == expected, path


def _inline(value: object) -> bytes:
    assert isinstance(value, str) and value.startswith("data:"), str(value)[:60]
    return base64.b64decode(value.split(",", 1)[1])


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# --------------------------------------------------------------------------- old README examples


QUICK_SETUP = '''
import asyncio
from replicate_batch_process import intelligent_batch_process

async def main():
    # Method 2: Parameter Passing (Highest Priority)
    await intelligent_batch_process(
        prompts=["beautiful sunset", "mountain landscape"],
        model_name="black-forest-labs/flux-dev",
        max_concurrent=8,  # Local concurrency limit
        global_max_concurrent=60,  # Global account limit
        replicate_api_token="r8_your_token_here"
    )

asyncio.run(main())
'''


def test_readme_quick_setup_parameter_passing(installed: Install, sim: Simulator,
                                              tmp_path: Path) -> None:
    # The README's fragment awaits at top level: it runs inside `async def main()`.
    done = run_example(installed, sim, tmp_path / "quick", QUICK_SETUP)
    assert done.returncode == 0, done.stderr
    assert sim.predictions(TOKEN) == []  # the token passed as a parameter pays
    made = _by_prompt(sim, "r8_your_token_here")
    assert {p["model"] for p in made.values()} == {"black-forest-labs/flux-dev"}
    out = tmp_path / "quick" / "output" / "intelligent_batch"
    names = _names(out)
    assert [re.sub(r"_\d{10}_", "_T_", n) for n in names] == [
        "intelligent_black_forest_labs_flux_dev_T_000.webp",
        "intelligent_black_forest_labs_flux_dev_T_001.webp"]
    _assert_made_by(out / names[0], made["beautiful sunset"], "webp")
    _assert_made_by(out / names[1], made["mountain landscape"], "webp")


SINGLE_IMAGE = '''
from replicate_batch_process import replicate_model_calling

# Basic text-to-image generation
file_paths = replicate_model_calling(
    prompt="A beautiful sunset over mountains",
    model_name="qwen/qwen-image",  # Use supported model
    output_filepath="output/sunset.jpg"
)

# With reference images using nano-banana model (generates square 1024x1024 images only)
file_paths = replicate_model_calling(
    prompt="Make the sheets in the style of the logo. Make the scene natural.",
    model_name="google/nano-banana",
    image_input=["logo.png", "style_ref.jpg"],
    output_format="jpg",
    output_filepath="output/styled_sheets.jpg"
)
'''


def test_readme_single_image_generation(installed: Install, sim: Simulator,
                                        tmp_path: Path) -> None:
    work = tmp_path / "single"
    done = run_example(installed, sim, work, SINGLE_IMAGE,
                       {"logo.png": PNG, "style_ref.jpg": JPEG})
    assert done.returncode == 0, done.stderr
    sunset, sheets = sim.predictions(TOKEN)
    assert (sunset["model"], sheets["model"]) == ("qwen/qwen-image", "google/nano-banana")
    # The local files are sent, inline, in order: the old library dropped them silently.
    assert [_inline(v) for v in sheets["input"]["image_input"]] == [PNG, JPEG]
    assert sheets["input"]["output_format"] == "jpg"
    # qwen makes WebP by default: the file is named for what it is, not sunset.jpg.
    assert _names(work / "output") == ["styled_sheets.jpg", "sunset.webp"]
    _assert_made_by(work / "output" / "sunset.webp", sunset, "webp")
    _assert_made_by(work / "output" / "styled_sheets.jpg", sheets, "jpg")


BASIC_BATCH = '''
import asyncio
from replicate_batch_process import intelligent_batch_process

async def main():
    # Process multiple prompts with the same model
    files = await intelligent_batch_process(
        prompts=["sunset", "city", "forest"],
        model_name="qwen/qwen-image",
        max_concurrent=8,
        output_filepath=["output/sunset.png", "output/city.png", "output/forest.png"]
    )

    print(f"Generated {len(files)} images:")
    for file in files:
        print(f"  - {file}")

    return files

# Run the async function
if __name__ == "__main__":
    results = asyncio.run(main())
'''


def test_readme_basic_batch_processing(installed: Install, sim: Simulator,
                                       tmp_path: Path) -> None:
    work = tmp_path / "basic"
    done = run_example(installed, sim, work, BASIC_BATCH)
    assert done.returncode == 0, done.stderr
    out = work.resolve() / "output"
    assert done.stdout.splitlines() == ["Generated 3 images:", f"  - {out / 'sunset.webp'}",
                                        f"  - {out / 'city.webp'}", f"  - {out / 'forest.webp'}"]
    made = _by_prompt(sim)
    assert sorted(made) == ["city", "forest", "sunset"]
    for prompt in made:
        _assert_made_by(out / f"{prompt}.webp", made[prompt], "webp")


ADVANCED_MIXED = '''
import asyncio
from replicate_batch_process import IntelligentBatchProcessor, BatchRequest

async def advanced_batch():
    processor = IntelligentBatchProcessor()

    # Create requests with different models and parameters
    requests = [
        BatchRequest(
            prompt="A futuristic city",
            model_name="qwen/qwen-image",
            output_filepath="output/city.png",
            kwargs={"aspect_ratio": "16:9"}
        ),
        BatchRequest(
            prompt="A magical forest",
            model_name="google/imagen-4-ultra",
            output_filepath="output/forest.png",
            kwargs={"output_quality": 90}
        ),
        BatchRequest(
            prompt="Character with red hair",
            model_name="black-forest-labs/flux-kontext-max",
            output_filepath="output/character.png",
            kwargs={"input_image": "reference.jpg"}
        )
    ]

    # Process all requests concurrently
    results = await processor.process_intelligent_batch(requests, max_concurrent=5)

    # Handle results
    successful = [r for r in results if r.success]
    failed = [r for r in results if not r.success]

    print(f"✅ Success: {len(successful)}/{len(results)}")
    for result in failed:
        print(f"❌ Failed: {result.error}")

    return results

# Run with proper async context
if __name__ == "__main__":
    asyncio.run(advanced_batch())
'''


def test_readme_advanced_mixed_model_batch(installed: Install, sim: Simulator,
                                           tmp_path: Path) -> None:
    work = tmp_path / "mixed"
    done = run_example(installed, sim, work, ADVANCED_MIXED, {"reference.jpg": JPEG})
    assert done.returncode == 0, done.stderr
    success, failure = done.stdout.splitlines()
    assert success == "✅ Success: 2/3"
    # imagen-4-ultra takes no output_quality: that item fails, said plainly, and costs nothing.
    assert failure.startswith("❌ Failed: google/imagen-4-ultra has no parameter 'output_quality'")
    assert "silently switched" in failure
    made = _by_prompt(sim)
    assert sorted(made) == ["A futuristic city", "Character with red hair"]
    city, character = made["A futuristic city"], made["Character with red hair"]
    assert (city["model"], city["input"]["aspect_ratio"]) == ("qwen/qwen-image", "16:9")
    assert character["model"] == "black-forest-labs/flux-kontext-max"
    assert _inline(character["input"]["input_image"]) == JPEG
    assert _names(work / "output") == ["character.png", "city.webp"]
    _assert_made_by(work / "output" / "city.webp", city, "webp")
    _assert_made_by(work / "output" / "character.png", character, "png")


GLOBAL_CONCURRENCY = '''
import asyncio
import os
from replicate_batch_process import intelligent_batch_process
from replicate_batch_process.global_concurrency_manager import get_global_status

async def global_concurrency_example():
    # Method 1: Environment Variables (Production Recommended)
    os.environ["REPLICATE_API_TOKEN"] = "r8_your_real_token_here"
    os.environ["REPLICATE_GLOBAL_MAX_CONCURRENT"] = "60"

    # Process images with global concurrency control
    prompts = ["beautiful sunset over mountains", "peaceful lake reflection", "city skyline at night"]

    files = await intelligent_batch_process(
        prompts=prompts,
        model_name="black-forest-labs/flux-dev",
        max_concurrent=8,  # Local concurrency limit per instance
        output_dir="./output"
        # Global limit (60) automatically applies from environment variable
    )

    # Monitor global concurrency status
    status = get_global_status()
    print(f"Global Status:")
    print(f"   Max concurrent: {status['global_max_concurrent']}")
    print(f"   Current active: {status['current_concurrent']}")
    print(f"   Available slots: {status['available_slots']}")
    print(f"   Utilization: {status['utilization_percentage']:.1f}%")

    return files

async def multi_instance_example():
    """Example: Multiple instances safely sharing global limits"""
    from replicate_batch_process import IntelligentBatchProcessor

    # Instance 1: Handles landscape images
    processor1 = IntelligentBatchProcessor(
        max_concurrent=8,  # Local limit
        replicate_api_token="r8_your_token_here",
        global_max_concurrent=60  # Shared global limit
    )

    # Instance 2: Handles portrait images
    processor2 = IntelligentBatchProcessor(
        max_concurrent=12,  # Different local limit
        replicate_api_token="r8_your_token_here"
        # global_max_concurrent automatically shared via singleton
    )

    # Both instances coordinate through shared global semaphore
    # Total concurrent requests across both will never exceed 60

    print("✅ Multi-instance setup complete - global coordination active!")

    # Check that both instances share the same global configuration
    status1 = processor1.global_manager.get_global_status()
    status2 = processor2.global_manager.get_global_status()
    print(f"Instance 1 sees global limit: {status1['global_max_concurrent']}")
    print(f"Instance 2 sees global limit: {status2['global_max_concurrent']}")
    print(f"✅ Verification: Both instances share same global state")

# Production usage
if __name__ == "__main__":
    # Run global concurrency example
    asyncio.run(global_concurrency_example())

    # Demonstrate multi-instance coordination
    asyncio.run(multi_instance_example())
'''  # noqa: E501 - the README's own lines, verbatim


def test_readme_global_concurrency_control(installed: Install, sim: Simulator,
                                           tmp_path: Path) -> None:
    work = tmp_path / "global"
    done = run_example(installed, sim, work, GLOBAL_CONCURRENCY)
    assert done.returncode == 0, done.stderr
    # Two asyncio.run calls in one process: the old semaphore broke on the second loop.
    assert done.stdout.splitlines() == [
        "Global Status:", "   Max concurrent: 60", "   Current active: 0",
        "   Available slots: 60", "   Utilization: 0.0%",
        "✅ Multi-instance setup complete - global coordination active!",
        "Instance 1 sees global limit: 60", "Instance 2 sees global limit: 60",
        "✅ Verification: Both instances share same global state"]
    assert sim.predictions(TOKEN) == []  # the token the script put in os.environ pays
    prompts = ["beautiful sunset over mountains", "peaceful lake reflection",
               "city skyline at night"]
    made = _by_prompt(sim, "r8_your_real_token_here")
    assert sorted(made) == sorted(prompts)
    names = _names(work / "output")
    assert [re.sub(r"_\d{10}_", "_T_", n) for n in names] == [
        f"intelligent_black_forest_labs_flux_dev_T_{i:03d}.webp" for i in range(3)]
    for name, prompt in zip(names, prompts, strict=True):
        _assert_made_by(work / "output" / name, made[prompt], "webp")


REFERENCE_AUTO_DETECTION = '''
from replicate_batch_process import replicate_model_calling

# User provides reference image to non-supporting model
replicate_model_calling(
    prompt="Generate based on this image",
    model_name="black-forest-labs/flux-dev",  # Doesn't support reference images
    input_image="path/to/image.jpg"           # → Auto-switches to flux-kontext-max
)

# Multiple reference images automatically route to nano-banana (square format only)
replicate_model_calling(
    prompt="Make the sheets in the style of the logo. Make the scene natural.",
    model_name="qwen/qwen-image",  # Doesn't support reference images
    image_input=["image1.jpg", "image2.png"]  # → Auto-switches to google/nano-banana (1024x1024)
)
'''


def test_readme_reference_images_are_routed_openly(installed: Install, sim: Simulator,
                                                   tmp_path: Path) -> None:
    files = {"path/to/image.jpg": JPEG, "image1.jpg": JPEG, "image2.png": PNG}
    done = run_example(installed, sim, tmp_path / "routed", REFERENCE_AUTO_DETECTION, files)
    assert done.returncode == 0, done.stderr
    kontext, nano = sim.predictions(TOKEN)
    assert kontext["model"] == "black-forest-labs/flux-kontext-max"
    assert _inline(kontext["input"]["input_image"]) == JPEG
    # What the old README promised and never did: several images go to nano-banana.
    assert nano["model"] == "google/nano-banana"
    assert [_inline(v) for v in nano["input"]["image_input"]] == [JPEG, PNG]
    jobs = tmp_path / "routed" / "jobs"
    assert len([p for p in jobs.rglob("*") if p.is_file()]) == 2


def test_readme_missing_reference_file_is_an_error(installed: Install, sim: Simulator,
                                                   tmp_path: Path) -> None:
    done = run_example(installed, sim, tmp_path / "missing", REFERENCE_AUTO_DETECTION)
    assert done.returncode == 1
    assert "reference file 'path/to/image.jpg' does not exist" in done.stderr
    assert sim.predictions(TOKEN) == []  # never sent without it


PARAMETER_COMPATIBILITY = '''
from replicate_batch_process import replicate_model_calling

# Unsupported parameters automatically cleaned and model switched
replicate_model_calling(
    prompt="Generate image",
    model_name="black-forest-labs/flux-kontext-max",
    guidance=3.5,        # Unsupported parameter
    num_outputs=2        # → Auto-switches to compatible model
)
'''


def test_readme_model_switch_on_unknown_parameter_is_a_clear_error(
        installed: Install, sim: Simulator, tmp_path: Path) -> None:
    done = run_example(installed, sim, tmp_path / "switch", PARAMETER_COMPATIBILITY)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("replicate_generation.compat.UnsupportedParameter: "
                           "black-forest-labs/flux-kontext-max has no parameter 'guidance'")
    assert "silently switched to another model" in last
    assert sim.predictions(TOKEN) == []


SHOWCASE = '''
import asyncio
import json
from replicate_batch_process.intelligent_batch_processor import intelligent_batch_process

prompts = ["#slow=0.5 watercolour fox", "#slow=0.25 ink fox", "#slow=0.01 pixel fox"]
output_filepaths = ["styles/watercolour.png", "styles/ink.png", "styles/pixel.png"]

async def main():
    # Process all 17 styles for Flux Dev model
    files = await intelligent_batch_process(
        prompts=prompts,
        model_name="black-forest-labs/flux-dev",
        max_concurrent=300,  # High concurrency for pressure testing
        output_filepath=output_filepaths,  # Precise naming control
        aspect_ratio="16:9",
        guidance=3.0
    )
    return files

print(json.dumps(asyncio.run(main())))
'''


def test_readme_showcase_returns_files_in_prompt_order(installed: Install, sim: Simulator,
                                                       tmp_path: Path) -> None:
    # The snippet awaits at top level with `prompts` undefined: they are given, slowest first.
    work = tmp_path / "showcase"
    done = run_example(installed, sim, work, SHOWCASE)
    assert done.returncode == 0, done.stderr
    styles = work.resolve() / "styles"
    order = ["watercolour", "ink", "pixel"]
    assert json.loads(done.stdout) == [str(styles / f"{name}.webp") for name in order]
    made = _by_prompt(sim)
    finished = sorted(made, key=lambda p: made[p]["completed_at_clock"])
    assert [p.split()[-2] for p in finished] == order[::-1]  # completion order was reversed
    for prompt, prediction in made.items():
        assert (prediction["input"]["aspect_ratio"], prediction["input"]["guidance"]) == \
            ("16:9", 3.0)
        _assert_made_by(styles / f"{prompt.split()[-2]}.webp", prediction, "webp")


ERROR_HANDLING = '''
import asyncio
from replicate_batch_process import IntelligentBatchProcessor, BatchRequest

async def batch_with_error_handling():
    processor = IntelligentBatchProcessor()
    requests = [
        BatchRequest(prompt="sunset", model_name="qwen/qwen-image", output_filepath="output/sunset.png"),
        BatchRequest(prompt="city", model_name="qwen/qwen-image", output_filepath="output/city.png"),
    ]
    results = await processor.process_intelligent_batch(requests)

    for result in results:
        if result.success:
            print(f"✅ Generated: {result.file_paths}")
        else:
            print(f"❌ Failed: {result.error}")

asyncio.run(batch_with_error_handling())
'''  # noqa: E501 - the README's own lines, verbatim


def test_readme_best_practices_error_handling(installed: Install, sim: Simulator,
                                              tmp_path: Path) -> None:
    # Only the second half of that block: its chunking half awaits outside an async def (a
    # SyntaxError) and the block never imports asyncio, added here.
    work = tmp_path / "practices"
    done = run_example(installed, sim, work, ERROR_HANDLING)
    assert done.returncode == 0, done.stderr
    out = work.resolve() / "output"
    assert done.stdout.splitlines() == [f"✅ Generated: {[str(out / 'sunset.webp')]}",
                                        f"✅ Generated: {[str(out / 'city.webp')]}"]
    made = _by_prompt(sim)
    _assert_made_by(out / "sunset.webp", made["sunset"], "webp")
    _assert_made_by(out / "city.webp", made["city"], "webp")


# --------------------------------------------------------------------------- beyond the README


CONTRACT = '''
import asyncio, json
from replicate_generation.compat import (GenerationFailed, intelligent_batch_process,
                                         replicate_model_calling)

report = {}
try:
    replicate_model_calling("#fail on every model", "qwen/qwen-image", "failed/cover.png")
except GenerationFailed as exc:
    report["failed"] = str(exc)
try:
    asyncio.run(intelligent_batch_process(["a", "b"], "qwen/qwen-image",
                                          output_filepath="same/cover.png"))
except ValueError as exc:
    report["one_path"] = str(exc)
report["first"] = replicate_model_calling("once", "qwen/qwen-image", "kept/cover.png")
try:
    replicate_model_calling("twice", "qwen/qwen-image", "kept/cover.png")
except FileExistsError as exc:
    report["refused"] = str(exc)
report["renamed"] = replicate_model_calling("thrice", "qwen/qwen-image", "kept/cover.png",
                                            if_exists="rename")
report["capped"] = asyncio.run(intelligent_batch_process(
    [f"#slow=0.3 item {i}" for i in range(4)], "qwen/qwen-image", max_concurrent=2,
    output_dir="capped"))
print(json.dumps(report))
'''


def test_compat_fails_loudly_refuses_overwrites_and_caps_locally(
        installed: Install, sim: Simulator, tmp_path: Path) -> None:
    work = _project_dir(tmp_path / "contract")
    script = work / "contract.py"
    script.write_text(CONTRACT)
    done = _run([str(installed.python), str(script)], work, sim, installed)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    # A failure raises, and leaves no file behind: no black image passed off as a result.
    assert "failed" in report and not (work / "failed").exists()
    assert "wrote every prompt's file to that same path" in report["one_path"]
    assert not (work / "same").exists()
    # The second call to the same name is refused before it is paid for; "rename" is forwarded.
    assert "already exists" in report["refused"]
    assert report["first"] == [str(work / "kept" / "cover.webp")]
    assert report["renamed"] != report["first"] and Path(report["renamed"][0]).exists()
    prompts = [str(p["input"]["prompt"]) for p in sim.predictions(TOKEN)]
    assert "twice" not in prompts and prompts.count("once") == prompts.count("thrice") == 1
    # max_concurrent=2 holds the four slow items to two in flight, in prompt order on disk.
    assert [Path(f).name[-9:] for f in report["capped"]] == [
        f"_{i:03d}.webp" for i in range(4)]
    assert sim.max_inflight_at_create(TOKEN, since=0) == 2
