"""Train the default SHiRA adapter (MiniLM, Rotten Tomatoes) from Python, then use it.

python examples/classify_with_adapter.py            # ~3 minutes on a 2-core CPU
python examples/classify_with_adapter.py --steps 10 # a quick smoke run
"""

import argparse

from jaxsparse.config import load_config
from jaxsparse.inference import SequenceClassifier
from jaxsparse.trainer import train

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=120)
parser.add_argument("--output", default="runs/example")
args = parser.parse_args()

cfg = load_config(None, [f"train.steps={args.steps}", "train.warmup_steps=1", f"output={args.output}"])
result = train(cfg)
print(f"held-out accuracy {result.final['accuracy']:.3f}; adapter in {result.adapter_dir}")

clf = SequenceClassifier.from_adapter(result.adapter_dir)
print(clf)
sentences = ["A gorgeous, witty, seductive movie.", "Dull, lifeless and far too long."]
for sentence, probs, label in zip(
    sentences, clf.classify(sentences), clf.decide_class(sentences), strict=True
):
    print(f"{label:>8}  {probs.max():.3f}  {sentence}")
