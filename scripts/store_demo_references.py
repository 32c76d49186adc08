"""Store finished full demo runs' reports as simla's shipped references (src/simla/demos/reference/).

    python scripts/store_demo_references.py retrieval=runs/demo vqa=runs/demo_vqa search=runs/demo_search ...

Then update the README's figures: tests/test_readme.py names every one that no longer matches.
"""

import argparse

from simla.demos.reference import HEADLINES, save_reference


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="DEMO=FOLDER", help=f"demo: one of {sorted(HEADLINES)}")
    parser.add_argument("--measured-under", metavar="TEXT",
                        help="what else ran on the machine, when the times are not an idle machine's")
    args = parser.parse_args(argv)
    for item in args.runs:
        demo, _, folder = item.partition("=")
        print(save_reference(demo, folder, args.measured_under))


if __name__ == "__main__":
    main()
