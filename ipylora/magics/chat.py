"""%lora_chat: answer with the active adapter (or the base), streamed into the cell."""

from __future__ import annotations

import sys

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments

from ipylora.engine import GenerateArgs, get_session
from ipylora.magics.args import split_leading_options
from ipylora.magics.common import user_errors

@magics_class
class ChatMagics(Magics):
    """%lora_chat."""

    @magic_arguments()
    @argument("--adapter", default=None, help='Adapter name, or "base" for the model without adapters.')
    @argument("--max-new-tokens", type=int, default=256, help="Most tokens to generate.")
    @argument("--temperature", type=float, default=0.0, help="0 = greedy (default); above 0 samples.")
    @argument("--top-p", type=float, default=1.0, help="Nucleus sampling threshold.")
    @argument("--raw", action="store_true", help="Send the text as is, without the training template.")
    @line_magic
    @user_errors
    def lora_chat(self, line):
        """Answer TEXT with the active adapter, in the template it was trained with. Options go first.

            %lora_chat generate a stable diffusion prompt for Neural Networks
            %lora_chat --adapter base generate a stable diffusion prompt for Neural Networks
        """
        opts, text = split_leading_options(self.lora_chat, line)
        if not text:
            raise UsageError("Nothing to answer: write the text after the options, e.g. %lora_chat describe a cat.")
        args = GenerateArgs(adapter=opts.adapter, max_new_tokens=opts.max_new_tokens,
                            temperature=opts.temperature, top_p=opts.top_p)
        result = get_session().chat(text, args, on_text=lambda piece: print(piece, end=""), raw=opts.raw)
        print(flush=True)
        if not result["stopped_at_eos"]:
            print(f"[no EOS: stopped at --max-new-tokens {args.max_new_tokens}]", file=sys.stderr, flush=True)
