"""A notebook that trains with --eval and --sample, run by nbclient on a real kernel; then a fresh
kernel lists the run with %lora_runs."""

import shutil

import pytest

from support import ROOT, run_notebook

PROMPT = "generate a stable diffusion prompt for"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("watched")
    shutil.copytree(ROOT / "examples" / "data", folder / "data")
    notebook, path = run_notebook([
        "%load_ext ipylora",
        f'%lora_dataset concepts --from data/concepts.csv --prompt "{PROMPT} {{concept}}" --response "{{description}}" --eval 0.1',
        f'%lora_train concepts --name watched --steps 300 --eval-every 30 --sample "{PROMPT} Neural Networks" --sample-every 100',
    ], folder)
    return notebook, path, folder


def test_one_final_plot_with_both_curves_and_the_samples(trained):
    notebook, path, _ = trained
    train = notebook.cells[2]
    plots = [o for o in train.outputs if "image/png" in o.get("data", {})]
    assert len(plots) == 1
    text = plots[0]["data"]["text/plain"]
    assert "step 300/300" in text and "train loss (300 points)" in text and "eval loss (10 points)" in text
    samples = [o["data"]["text/plain"] for o in train.outputs
               if "sample" in o.get("data", {}).get("text/html", "") and "step 300" in o["data"].get("text/plain", "")]
    assert len(samples) == 1 and f"'{PROMPT} Neural Networks' ->" in samples[0]
    steps = [int(line.split()[1]) for line in samples[0].splitlines()]
    assert steps == sorted(steps, reverse=True) and steps[0] == 300, "samples are shown newest first"
    assert path.stat().st_size < 1_000_000


def test_a_fresh_kernel_lists_the_run(trained):
    _, _, folder = trained
    notebook, _ = run_notebook(["%load_ext ipylora", "%lora_runs"], folder)
    table = notebook.cells[1].outputs[0]["data"]["text/plain"]
    assert "watched" in table and "finished" in table and "300/300" in table
