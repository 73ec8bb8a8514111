"""Pre-train a tiny BERT (MLM + NSP) from raw text, from scratch, in a few minutes on a CPU.

    python examples/pretrain_tiny.py corpus.txt runs/tiny

corpus.txt: one sentence per line, a blank line between documents. The same from the shell:
    fastbert pretrain --train-files corpus.txt --config tiny --output-dir runs/tiny
"""
import random
import sys

import fastbert
from fastbert import data, train

text_file, output_dir = sys.argv[1], sys.argv[2]

tokenizer = data.Tokenizer.train([text_file], vocab_size=8000)
documents = [[tokenizer.tokenize(sentence) for sentence in doc] for doc in data.read_documents([text_file])]
train_docs, eval_docs = data.split_holdout(documents, 0.05, seed=0)
rng = random.Random(0)
train_examples = data.build_nsp_examples(train_docs, tokenizer, max_length=128, rng=rng)
eval_examples = data.build_nsp_examples(eval_docs, tokenizer, max_length=128, rng=rng)

config = fastbert.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=128, num_hidden_layers=2,
                             num_attention_heads=2, intermediate_size=512, max_position_embeddings=128)
model = fastbert.BertForPreTraining(config)
task = train.pretraining_task(train_examples, tokenizer, eval_examples)
settings = train.TrainConfig(output_dir=output_dir, epochs=3, batch_size=32, lr=1e-3, warmup_ratio=0.1,
                             eval_every=200, save_every=200)
metrics = train.Trainer(model, task, settings, tokenizer).train()
print(metrics["final"])  # eval loss, MLM and NSP accuracy; the model is in output_dir
