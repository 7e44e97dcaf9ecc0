"""The bad-input corpus: every magic, fed the mistakes users make.

Each case is (id, cell source, substrings the one-line error must contain). `{DATA}` is replaced
by this folder's path. Variables the cases refer to are set up by the test (`VARIABLES`).
"""

CASES = [
    # %%lora_dataset: malformed data
    ("csv-ragged-row", "%%lora_dataset d\na,b\n1,2\n3,4,5\n", ["line 3", "quotes"]),
    ("json-invalid", '%%lora_dataset d\n[{"a": 1}, {"a": }]', ["line 1", "column"]),
    ("jsonl-not-object", '%%lora_dataset d --reader jsonl\n{"a": 1}\n[1, 2]\n', ["line 2"]),
    ("empty-cell", "%%lora_dataset d\n   \n", ["no data"]),
    ("header-only-inline", "%%lora_dataset d\na,b\n", ["no rows"]),
    ("empty-file", "%lora_dataset d --from {DATA}/empty.csv", ["empty"]),
    ("header-only-file", "%lora_dataset d --from {DATA}/header_only.csv", ["no rows"]),
    ("binary-file", "%lora_dataset d --from {DATA}/binary.csv", ["binary", "text file"]),
    ("missing-file", "%lora_dataset d --from {DATA}/goood.csv", ["Did you mean", "good.csv"]),
    ("directory-as-file", "%lora_dataset d --from {DATA}", ["folder"]),
    ("unknown-extension", "%lora_dataset d --from {DATA}/cases.py", ["extension"]),
    ("column-typo", '%lora_dataset d --from {DATA}/good.csv --prompt "{Concept}" --response "{description}"',
     ["concept, description", "Did you mean {concept}"]),
    ("column-twice", "%lora_dataset d --from {DATA}/good.csv --columns prompt=concept,response=concept", ["twice"]),
    ("prompt-without-response", '%lora_dataset d --from {DATA}/good.csv --prompt "{concept}"', ["--response"]),
    ("template-unknown", "%lora_dataset d --from {DATA}/good.csv --template human_assistant", ["template"]),
    ("template-no-response-slot", '%lora_dataset d --from {DATA}/good.csv --template "Q: {prompt}"', ["{response}"]),
    ("format-unknown", "%lora_dataset d --from {DATA}/good.csv --format alpacca", ["format"]),
    ("nan-cells", "%%lora_dataset d\nq,a\nhi,\nyo,there\n", ["empty"]),
    ("variable-wrong-type", "%lora_dataset d --from number", ["int"]),
    ("variable-unknown", "%lora_dataset d --from no_such_variable", ["no_such_variable"]),
    ("eval-share-too-big", "%lora_dataset d --from {DATA}/good.csv --eval 1.5", ["--eval"]),
    ("limit-negative", "%lora_dataset d --from {DATA}/good.csv --limit -3", ["--limit"]),
    ("dataset-name-traversal", "%lora_dataset ../evil --from {DATA}/good.csv", ["name"]),
    ("unclosed-quote", '%lora_dataset d --from {DATA}/good.csv --prompt "oops', ["quote"]),
    ("dataset-unknown-flag", "%lora_dataset d --from {DATA}/good.csv --promt x", ["--promt", "Did you mean --prompt"]),
    # %lora_train: names, flags, ranges
    ("train-unknown-dataset", "%lora_train nope", ["No dataset named 'nope'", "%%lora_dataset nope"]),
    ("train-no-dataset", "%lora_train", ["Which dataset"]),
    ("train-unknown-flag", "%lora_train ok --epoch 3", ["--epoch", "Did you mean --epochs"]),
    ("train-lr-negative", "%lora_train ok --lr -1", ["--lr"]),
    ("train-lr-not-a-number", "%lora_train ok --lr fast", ["--lr"]),
    ("train-rank-zero", "%lora_train ok --r 0", ["--r 0"]),
    ("train-rank-huge", "%lora_train ok --r 100000", ["--r"]),
    ("train-dropout-one", "%lora_train ok --dropout 1", ["--dropout"]),
    ("train-steps-zero", "%lora_train ok --steps 0", ["--steps"]),
    ("train-steps-huge", "%lora_train ok --steps 10000000000", ["--steps"]),
    ("train-batch-zero", "%lora_train ok --batch-size 0", ["--batch-size"]),
    ("train-max-length-tiny", "%lora_train ok --max-length 2", ["--max-length"]),
    ("train-both-quantizations", "%lora_train ok --4bit --8bit", ["--4bit", "--8bit"]),
    ("train-scheduler-unknown", "%lora_train ok --scheduler zigzag", ["--scheduler"]),
    ("train-name-traversal", "%lora_train ok --name ../../etc", ["name"]),
    ("train-name-absolute", "%lora_train ok --name /tmp/x", ["name"]),
    ("train-model-missing-dir", "%lora_train ok --model ./no/such/model", ["Could not load"]),
    ("train-early-stop-no-eval", "%lora_train ok --early-stop 2", ["--early-stop", "--eval"]),
    ("train-resume-unknown", "%lora_train --resume ghost", ["ghost"]),
    ("train-stop-nothing", "%lora_train --stop", ["No training is running"]),
    # %lora_chat
    ("chat-unknown-adapter", "%lora_chat --adapter ghost hello", ["No adapter named 'ghost'"]),
    ("chat-max-new-tokens-zero", "%lora_chat --max-new-tokens 0 hello", ["--max-new-tokens"]),
    ("chat-temperature-negative", "%lora_chat --temperature -1 hello", ["--temperature"]),
    ("chat-top-p-zero", "%lora_chat --temperature 0.7 --top-p 0 hello", ["--top-p"]),
    ("chat-unknown-flag", "%lora_chat --adaptr x hello", ["--adaptr"]),
    # %lora_status, %lora_runs, %lora_adapters, %lora_unload
    ("status-arguments", "%lora_status please", ["no arguments"]),
    ("runs-plot-unknown", "%lora_runs --plot ghost,phantom", ["ghost"]),
    ("adapters-use-unknown", "%lora_adapters --use ghost", ["No adapter named 'ghost'"]),
    ("adapters-delete-unknown", "%lora_adapters --delete ghost", ["ghost"]),
    ("adapters-load-missing", "%lora_adapters --load ghost", ["No saved adapter"]),
    ("unload-arguments", "%lora_unload now", ["no arguments"]),
]

VARIABLES = {"number": 42}
