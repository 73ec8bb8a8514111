"""Train a small causal LM on a text file, then continue a prompt with it (KV-cached decoding).

    python examples/generate.py corpus.txt runs/lm "the history of"

From the shell:
    fastbert pretrain --objective clm --train-files corpus.txt --output-dir runs/lm
    fastbert generate --model runs/lm --prompt "the history of" --do-sample --top-k 20
"""
import sys

import torch

import fastbert
from fastbert import data, train

text_file, output_dir, prompt = sys.argv[1], sys.argv[2], sys.argv[3]

tokenizer = data.Tokenizer.train([text_file], vocab_size=8000)
documents = [[tokenizer.tokenize(sentence) for sentence in doc] for doc in data.read_documents([text_file])]
sequences = data.build_lm_examples(documents, tokenizer, max_length=128)

config = fastbert.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=256, num_hidden_layers=4,
                             num_attention_heads=4, intermediate_size=1024, max_position_embeddings=256)
model = fastbert.BertLMHeadModel(config)
settings = train.TrainConfig(output_dir=output_dir, epochs=5, batch_size=16, lr=1e-3)
train.Trainer(model, train.causal_lm_task(sequences, tokenizer), settings, tokenizer).train()

model.eval()
input_ids = torch.tensor([[tokenizer.cls_id] + tokenizer.tokenize(prompt)], device=next(model.parameters()).device)
for sample in (False, True):  # greedy, then top-k sampling
    output = model.generate(input_ids, max_new_tokens=40, eos_token_id=tokenizer.sep_id,
                            do_sample=sample, temperature=0.8, top_k=20)
    print(("sampled: " if sample else "greedy:  ") + tokenizer.decode(output[0].tolist()))
