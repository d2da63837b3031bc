// A client that is not ours: @grpc/grpc-js loading the .proto files at run time.
// usage: node generate.js <target> <protos dir> <adapter id> <prompt>
const grpc = require("@grpc/grpc-js");
const loader = require("@grpc/proto-loader");

const [target, protos, adapterId, prompt] = process.argv.slice(2);
const def = loader.loadSync("hotswap/v1/inference.proto", { includeDirs: [protos], keepCase: true, longs: Number, enums: String, defaults: true });
const hotswap = grpc.loadPackageDefinition(def).hotswap.v1;
const client = new hotswap.InferenceService(target, grpc.credentials.createInsecure());
const request = { adapter_id: adapterId, prompt, sampling: { max_new_tokens: 8, ignore_eos: true } };
client.Generate(request, { deadline: Date.now() + 60000 }, (err, res) => {
  if (err) {
    console.error(JSON.stringify({ code: err.code, details: err.details }));
    process.exit(1);
  }
  console.log(JSON.stringify(res));
});
