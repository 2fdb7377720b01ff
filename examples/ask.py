"""Ask a qroute instance a question through the official openai client and show what qroute did.

    python examples/ask.py --url http://127.0.0.1:8100/v1 --mode route "Where is connect defined?"
"""

import argparse

from openai import OpenAI


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("question")
    parser.add_argument("--url", default="http://127.0.0.1:8100/v1")
    parser.add_argument("--corpus", default="corpus")
    parser.add_argument("--mode", choices=["auto", "route", "fetch", "local"], default="auto")
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()
    client = OpenAI(base_url=args.url, api_key="unused")
    reply = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": args.question}],
        max_tokens=args.max_tokens,
        temperature=0.0,
        extra_body={"kv_transfer_params": {"qroute": {"corpus": args.corpus, "mode": args.mode}}},
    )
    qroute = ((reply.model_extra or {}).get("kv_transfer_params") or {}).get("qroute")
    print(f"[{args.mode}] {reply.choices[0].message.content!r}\n  qroute: {qroute}")


if __name__ == "__main__":
    main()
