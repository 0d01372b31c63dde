"""fdfa's entry point in a checkout: ``python run.py ARGS`` is ``fdfa ARGS`` (fdfa/cli.py).

    python run.py                                   # FDFA, FC 2x800, MNIST
    python run.py algorithm=dfa model=cnn optimizer.lr=3e-4
    python run.py -m algorithm=bp,dfa,dkp,fdfa seed=0,1

Config lives in conf/; every run writes metrics.jsonl and summary.json into its Hydra run dir.
"""

from fdfa.cli import main

if __name__ == "__main__":
    main()
