# CDK targets; the Makefile includes this after defining $(VENV) and the $(VENV)/.installed target.
#   make synth                      Lambda bundle + cdk.out/ (no Docker, no AWS credentials); cdk-nag runs
#                                   inside the synthesis, cfn-lint on its template afterwards
#   make deploy                     synth, then deploy cdk.out/ (needs Docker and credentials)
#   make synth CDK_ARGS="-c stage=dev -c download_hosts=slides.example.org"
PY ?= $(VENV)/bin/python
CDK := node_modules/.bin/cdk
CDK_ARGS ?=

# aws-cdk-lib's jsii runtime prints a banner per process on Node versions it no longer supports.
export JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION ?= 18,20
export JSII_SILENCE_WARNING_DEPRECATED_NODE_VERSION ?= 1

# The CDK CLI pinned in package-lock.json, installed locally (npm ci wipes node_modules, hence the stamp).
node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund
	touch $@

.PHONY: lambda-bundle synth deploy
lambda-bundle: $(VENV)/.installed
	$(PY) -m infra.bundle

# Offline on purpose: no notices fetch, no telemetry upload. W3005 (a DependsOn that a reference already
# implies) comes from CDK's own constructs.
synth: lambda-bundle node_modules/.installed
	CDK_DISABLE_CLI_TELEMETRY=true $(CDK) synth --quiet --no-notices $(CDK_ARGS)
	$(VENV)/bin/cfn-lint --ignore-checks W3005 --regions eu-west-1 us-east-1 -- cdk.out/*.template.json

deploy: synth
	$(CDK) deploy --app cdk.out $(CDK_DEPLOY_ARGS)
