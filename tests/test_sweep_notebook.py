"""A notebook that sweeps with %lora_sweep, run by nbclient on a real kernel: the live panel leaves
one final frame of each artifact; a fresh kernel lists the trials and resumes nothing left to do."""

import json
import shutil

from support import ROOT, run_notebook

PROMPT = "generate a stable diffusion prompt for"


def test_a_sweep_in_a_notebook_keeps_one_final_frame_of_each_artifact(tmp_path):
    shutil.copytree(ROOT / "examples" / "data", tmp_path / "data")
    notebook, path = run_notebook([
        "%load_ext ipylora",
        f'%lora_dataset c --from data/concepts.csv --prompt "{PROMPT} {{concept}}" --response "{{description}}" '
        "--limit 16 --eval 4",
        "%lora_sweep c --name nb --steps 8 --eval-every 2 lr=1e-3,1e-2 r=4,8",
        "%lora_adapters",
    ], tmp_path)
    outputs = notebook.cells[2].outputs
    texts = ["".join(o.get("data", {}).get("text/plain", "")) for o in outputs]
    # Exactly three outputs however many steps and trials ran: the line, the plot, the leaderboard.
    assert len(outputs) == 3, texts
    line, plot, board = texts
    assert "image/png" in outputs[1]["data"] and "4/4 trials" in plot and "best" in plot
    record = json.loads((tmp_path / "runs" / "nb" / "sweep.json").read_text())
    best = record["best"]
    assert line.startswith("nb finished: 4/4 trials") and best["run"] in line
    rows = board.splitlines()[1:]
    assert len(rows) == 4 and rows[0].startswith(f"★ {best['trial'] + 1} ")  # best first, marked
    best = best["run"]
    adapters = notebook.cells[3].outputs[0]["data"]["text/plain"]
    assert best in adapters and "yes" in adapters.split(best, 1)[1].splitlines()[0]
    assert path.stat().st_size < 1_000_000

    fresh, _ = run_notebook(["%load_ext ipylora", "%lora_runs"], tmp_path)
    table = fresh.cells[1].outputs[0]["data"]["text/plain"]
    assert all(t["run"] in table for t in record["trials"]) and "nb #4" in table
