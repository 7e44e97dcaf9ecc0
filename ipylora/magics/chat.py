"""%lora_chat: answer with the active adapter (or the base), compare adapters, or open the chat widget."""

from __future__ import annotations

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments
from IPython.display import display

from ipylora.engine import GenerateArgs, get_session, graphdecode
from ipylora.magics.args import split_leading_options
from ipylora.magics.common import in_kernel, user_errors
from ipylora.magics.dataset import _unescape


@magics_class
class ChatMagics(Magics):
    """%lora_chat."""

    @magic_arguments()
    @argument("-a", "--adapter", default=None, help='Adapter name, or "base" for the model without adapters.')
    @argument("-n", "--max-new-tokens", type=int, default=256, help="Most tokens to generate.")
    @argument("-t", "--temperature", type=float, default=0.0, help="0 = greedy (default); above 0 samples.")
    @argument("-p", "--top-p", type=float, default=1.0, help="Nucleus sampling threshold.")
    @argument("-s", "--system", default=None,
              help='System prompt (quote it; \\n is a newline). Default: the one the adapter was trained with; "none": no system prompt.')
    @argument("--raw", action="store_true", help="Send the text as is, without the training template.")
    @argument("--compile", action="store_true",
              help="CUDA: torch.compile the decode step's layers (once; inductor caches it on disk) before capturing it.")
    @argument("-c", "--compare", default=None, help='Comma-separated adapters to answer side by side, e.g. "base,sd-prompts".')
    @argument("--prompts-from", default=None, help="With --compare: take the prompts from DATASET[:train|eval].")
    @argument("--limit", type=int, default=5, help="With --prompts-from: how many rows (default 5).")
    @argument("-m", "--model", default=None, help="Load this base model first (hub id or folder), to chat with it as is.")
    @argument("--4bit", dest="q4", action="store_true", help="With --model: load it in 4-bit nf4.")
    @argument("--8bit", dest="q8", action="store_true", help="With --model: load it in 8-bit.")
    @argument("--trust-remote-code", action="store_true", help="With --model: allow the model's own Python code.")
    @line_magic
    @user_errors
    def lora_chat(self, line):
        """Answer TEXT with the active adapter, in the template it was trained with. Options go first.
        With no TEXT (in a notebook), open the chat widget: streaming, multi-turn, Stop.
        The system prompt the adapter was trained with goes first unless --system says otherwise;
        `\\n` in TEXT or --system is a newline.

            %lora_chat generate a stable diffusion prompt for Neural Networks
            %lora_chat --adapter base generate a stable diffusion prompt for Neural Networks
            %lora_chat --system "You are terse.\\nAnswer in one line." What is LoRA?
            %lora_chat --compare base,sd-prompts generate a stable diffusion prompt for Neural Networks
            %lora_chat --compare base,sd-prompts --prompts-from concepts:eval --limit 5
            %lora_chat --model Qwen/Qwen-7B-Chat --trust-remote-code Hello!
            %lora_chat
        """
        opts, text = split_leading_options(self.lora_chat, line)
        session = get_session()
        args = GenerateArgs(adapter=opts.adapter, max_new_tokens=opts.max_new_tokens,
                            temperature=opts.temperature, top_p=opts.top_p, compile=opts.compile)
        if opts.q4 and opts.q8:
            raise UsageError("Choose one of --4bit and --8bit.")
        if (opts.q4 or opts.q8 or opts.trust_remote_code) and not opts.model:
            raise UsageError("--4bit, --8bit and --trust-remote-code go with --model NAME (the model to load).")
        text, system = _unescape(text), _system_option(opts.system)
        if opts.model:
            session.ensure_model(opts.model, "4bit" if opts.q4 else "8bit" if opts.q8 else None,
                                 opts.trust_remote_code)
        if opts.compare or opts.prompts_from:
            return self._compare(session, opts, text, args, system)
        if not text:
            if opts.raw or system is not None:
                raise UsageError("--raw and --system go with a TEXT to answer (the widget has its own system box).")
            return self._widget(session, args)
        if system is None and not opts.raw:
            note = session.system_prompt(args.adapter).note
            if note:
                print(f"[{note} — --system TEXT or --system none to choose]", flush=True)
        result = session.chat(text, args, on_text=lambda piece: print(piece, end="", flush=True), raw=opts.raw,
                              system=system)
        print(flush=True)
        if not result["stopped_at_eos"]:
            print(f"[no EOS: stopped at --max-new-tokens {args.max_new_tokens}]", flush=True)
        if args.compile and not graphdecode.usable(session.model):
            print("[--compile needs a CUDA GPU (and a model transformers can decode with a static cache): "
                  "this answer was decoded without it]", flush=True)

    def _compare(self, session, opts, text, args, system):
        from ipylora.engine.evaluate import dataset_examples, parse_dataset_spec
        from ipylora.ui.compare import compare_table

        if not opts.compare:
            raise UsageError("--prompts-from goes with --compare, e.g. --compare base,sd --prompts-from concepts:eval.")
        names = [n.strip() for n in opts.compare.split(",") if n.strip()]
        if not names:
            raise UsageError('--compare needs adapter names, e.g. --compare base,sd-prompts.')
        references = None
        if opts.prompts_from:
            if text:
                raise UsageError("Give either a prompt or --prompts-from DATASET, not both.")
            if opts.limit < 1:
                raise UsageError(f"--limit {opts.limit} must be at least 1.")
            dataset, split = parse_dataset_spec(opts.prompts_from)
            examples = dataset_examples(session.dataset(dataset), split, opts.limit)
            # A row's whole prompt side (system, earlier turns, last user turn), as training formatted it.
            prompts = [list(e.messages) if e.messages else e.prompt for e in examples]
            references = [e.reference for e in examples]
        elif text:
            prompts = [text]
        else:
            raise UsageError("Nothing to compare: write the prompt after the options, or add --prompts-from DATASET.")
        if opts.raw:
            raise UsageError("--raw goes with a single answer; --compare formats prompts as each adapter was trained.")
        result = session.compare(prompts, names, args, system)
        for note in result["notes"]:
            print(f"[{note} — --system TEXT or --system none to choose]", flush=True)
        display(compare_table(result, references))

    def _widget(self, session, args):
        if not in_kernel(self.shell):
            raise UsageError("The chat widget needs a notebook; here, write the text: %lora_chat describe a cat.")
        from ipylora.ui.chat_widget import ChatWidget

        display(ChatWidget(session, args))


def _system_option(value: str | None) -> str | None:
    """--system: None (not given: the trained one), "" for "none", else the text with \\n as newlines."""
    if value is None:
        return None
    if value.strip().lower() == "none":
        return ""
    if not value.strip():
        raise UsageError('--system is empty: give the text in quotes, or --system none for no system prompt.')
    return _unescape(value)
