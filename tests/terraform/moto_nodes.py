"""Sets up nodes on a moto server the way terraform/modules/node does on AWS, then turns IAM
enforcement on.

For each node id: an IAM user, a managed policy rendered from policy.json.tftpl (the same template
Terraform deploys), the attachment and an access key. The bucket is created first (unless it
exists), while moto still accepts any request. Finally `POST /moto-api/reset-auth` with body 0 makes every later request
authenticate and pass IAM policy evaluation.

Usage: moto_nodes.py ENDPOINT BUCKET NODE_ID...
Prints one line per node: NODE_ID ACCESS_KEY_ID SECRET_ACCESS_KEY
"""

import sys
import urllib.request

import boto3
import botocore.config

import node_policy


def main():
    if len(sys.argv) < 4:
        sys.exit(f"usage: {sys.argv[0]} ENDPOINT BUCKET NODE_ID...")
    endpoint, bucket, node_ids = sys.argv[1], sys.argv[2], sys.argv[3:]
    session = boto3.session.Session(aws_access_key_id="setup", aws_secret_access_key="setup", region_name="us-east-1")
    iam = session.client("iam", endpoint_url=endpoint)
    s3 = session.client("s3", endpoint_url=endpoint,
                        config=botocore.config.Config(s3={"addressing_style": "path"}))
    if bucket not in {b["Name"] for b in s3.list_buckets().get("Buckets", [])}:
        s3.create_bucket(Bucket=bucket)
    lines = []
    for node_id in node_ids:
        name = f"hoshino-node-{node_id}"
        iam.create_user(UserName=name, Path="/hoshino/")
        arn = iam.create_policy(
            PolicyName=name, Path="/hoshino/",
            PolicyDocument=node_policy.render(f"arn:aws:s3:::{bucket}", node_id),
        )["Policy"]["Arn"]
        iam.attach_user_policy(UserName=name, PolicyArn=arn)
        key = iam.create_access_key(UserName=name)["AccessKey"]
        lines.append(f"{node_id} {key['AccessKeyId']} {key['SecretAccessKey']}")
    req = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=b"0",
                                 headers={"Content-Type": "text/plain"}, method="POST")
    with urllib.request.urlopen(req, timeout=10) as resp:
        if resp.status != 200:
            sys.exit(f"reset-auth answered {resp.status}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
