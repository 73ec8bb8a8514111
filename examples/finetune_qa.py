"""Fine-tune a BERT checkpoint for extractive QA on SQuAD-format JSON (v1.1 or v2.0).

    python examples/finetune_qa.py CHECKPOINT train-v1.1.json dev-v1.1.json runs/squad

From the shell:
    fastbert finetune-qa --model CHECKPOINT --train train-v1.1.json --eval dev-v1.1.json --output-dir runs/squad
"""
import sys

import fastbert
from fastbert import data, train

checkpoint, train_file, dev_file, output_dir = sys.argv[1:5]

tokenizer = data.Tokenizer.from_pretrained(checkpoint)
# long contexts become windows of 384 tokens whose starts are 128 context tokens apart
train_features = data.squad_features(data.read_squad(train_file), tokenizer, max_length=384, doc_stride=128)
dev_examples = data.read_squad(dev_file)
dev_features = data.squad_features(dev_examples, tokenizer, max_length=384, doc_stride=128)
version_2 = any(not ex.answers for ex in dev_examples)  # unanswerable questions: allow "no answer"

model = fastbert.BertForQuestionAnswering.from_pretrained(checkpoint)
task = train.qa_task(train_features, tokenizer, dev_examples, dev_features, version_2=version_2)
settings = train.TrainConfig(output_dir=output_dir, epochs=2, batch_size=12, lr=3e-5, save_every=2000)
metrics = train.Trainer(model, task, settings, tokenizer).train()
print(f"EM {metrics['final']['eval_exact_match']:.2f}  F1 {metrics['final']['eval_f1']:.2f}")
