"""Task data (generated zoo tasks, GLUE, GSM8K), the zoo corpus, and pre-training of zoo models."""


rule zoo_corpus:
    output:
        RESULTS + "/zoo/corpus.txt",
    params:
        seed=config["zoo"]["seed"],
        sentences=config["zoo"]["corpus_sentences"],
    resources:
        **job_resources("light"),
    log:
        RESULTS + "/logs/zoo_corpus.log",
    conda:
        "../../envs/train.yaml"
    script:
        "../scripts/zoo_corpus.py"


rule zoo_heldout_text:
    output:
        RESULTS + "/zoo/heldout.txt",
    params:
        seed=config["zoo"]["seed"],
        sentences=1000,
        purpose="heldout",
    resources:
        **job_resources("light"),
    log:
        RESULTS + "/logs/zoo_heldout_text.log",
    conda:
        "../../envs/train.yaml"
    script:
        "../scripts/zoo_corpus.py"


rule task_data:
    output:
        **{split: task_data("{task}", split) for split in ("train", "validation", "test")},
    params:
        zoo=config["zoo"],
        data=config.get("data", {}),
    resources:
        **job_resources("light"),
    log:
        RESULTS + "/logs/task_data/{task}.log",
    conda:
        "../../envs/train.yaml"
    script:
        "../scripts/task_data.py"


rule pretrain:
    input:
        corpus=RESULTS + "/zoo/corpus.txt",
    output:
        directory(RESULTS + "/{model}/pretrained"),
    params:
        model=lambda wc: config["models"][wc.model],
        seed=config["zoo"]["seed"],
    threads: 2
    resources:
        **job_resources("train"),
    log:
        RESULTS + "/logs/pretrain/{model}.log",
    benchmark:
        RESULTS + "/benchmarks/pretrain/{model}.tsv"
    conda:
        "../../envs/train.yaml"
    script:
        "../scripts/pretrain.py"
