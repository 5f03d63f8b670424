"""AWS Lambda functions: thin handlers over slidebridge."""
