"""Train the small byte-level BPE tokenizer that the tiny test models use (tests/assets/tokenizer.json).

Run from the repository root: python tests/assets/make_tokenizer.py
The result is committed, so tests never train it; rerun only to change it. Training is deterministic
for a fixed corpus and `tokenizers` version.
"""

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

CORPUS = """
The quick brown fox jumps over the lazy dog. What is the capital of France? The capital of France is Paris.
You are a helpful assistant. Answer briefly and politely. Thank you for your question!
Recipe: Tomato soup. Ingredients: 2 cups chopped tomatoes, 1 onion, finely diced; 3 cloves garlic, minced;
1 tablespoon olive oil; salt and pepper to taste. Steps: Heat the oil, add the onion and garlic, cook
until soft. Add tomatoes and simmer for 20 minutes. Blend and season.
["tomato", "onion", "garlic", "olive oil", "salt", "pepper"]
{"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "Hi there!"}]}
Customer: My order has not arrived. Agent: I am sorry to hear that. Could you share your order number?
Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000 1/2 3/4 250 g 500 ml 1 kg 2 tsp 1 tbsp 350 F 180 C.
Héllo wörld, naïve café, 日本語, emoji 🍝 and tabs\tand newlines\n\nare fine.
def main(): return {"ok": True, "items": [1, 2, 3]}
"""


def main() -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=1,
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS] * 20, trainer=trainer)
    out = Path(__file__).with_name("tokenizer.json")
    tok.save(str(out))
    print(f"wrote {out} ({tok.get_vocab_size()} tokens)")


if __name__ == "__main__":
    main()
