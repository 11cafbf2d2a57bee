"""Run train.py with several seeds and give each held-out score as mean and min-max: in the miniature world the
seed alone moves exact-match accuracy by several points, so one run is not a result.

    python seeds.py --modality audio                        # seeds 1337, 1338, 1339 of the default run
    python seeds.py --seeds 5 --modality video --inject input --blind_control False

Every other flag goes to train.py as it is. Run k is `train.py --seed 1337+k --out_dir out/seeds/NAME-sSEED`
(NAME from the flags); a run whose results.json exists is read, not run again, so an interrupted table resumes.
The summary is printed and written to out/seeds/NAME.json.
"""
import json
import statistics
import subprocess
import sys
from pathlib import Path


def summary(results: list[dict], part: str) -> dict[str, list[float]]:
    """score -> [mean, min, max] over the runs (part: "scores" or "blind")."""
    keys = [k for k in results[0][part] if k != "items"]
    return {k: [statistics.mean(r[part][k] for r in results), min(r[part][k] for r in results),
                max(r[part][k] for r in results)] for k in keys}


def main(argv: list[str]) -> None:
    seeds = 3
    if "--seeds" in argv or any(a.startswith("--seeds=") for a in argv):
        i = next(i for i, a in enumerate(argv) if a.startswith("--seeds"))
        raw = argv[i].split("=", 1)[1] if "=" in argv[i] else (argv[i + 1] if i + 1 < len(argv) else "")
        del argv[i:i + (1 if "=" in argv[i] else 2)]
        if not raw.isdigit() or int(raw) < 1:
            sys.exit(f"error: --seeds {raw}: expected a positive integer")
        seeds = int(raw)
    if any(a.startswith(("--seed=", "--out_dir")) or a == "--seed" for a in argv):
        sys.exit("error: seeds.py chooses --seed and --out_dir itself")
    name = "-".join(a.lstrip("-").replace("=", "_").replace("/", "_") for a in argv) or "default"
    results = []
    for seed in range(1337, 1337 + seeds):
        run = Path("out/seeds") / f"{name}-s{seed}"
        if not (run / "results.json").exists():
            cmd = [sys.executable, str(Path(__file__).with_name("train.py")), *argv, "--seed", str(seed),
                   "--out_dir", str(run)]
            print(f"seed {seed}: {' '.join(cmd[1:])}", flush=True)
            if subprocess.run(cmd).returncode != 0:
                sys.exit(f"error: the run with seed {seed} failed (its output is above)")
        results.append(json.loads((run / "results.json").read_text()))
    table = {"runs": len(results), "items": results[0]["scores"].get("items"), "eP-ALM": summary(results, "scores")}
    if all(r.get("blind") for r in results):
        table["blind"] = summary(results, "blind")
    print(f"{len(results)} seeds, {table['items']} held-out items each: mean (min-max)")
    for part in ("eP-ALM", "blind"):
        for k, (mean, low, high) in table.get(part, {}).items():
            pct = k != "CIDEr" and not k.startswith("BLEU")
            fmt = (lambda x: f"{100 * x:.1f}") if pct else (lambda x: f"{x:.3f}")
            print(f"  {part:<7} {k:<22} {fmt(mean):>6} ({fmt(low)}-{fmt(high)})")
    Path("out/seeds", f"{name}.json").write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
